"""Paint a label map, get photos: `python -m scdm.app --model_path RUN_FOLDER_OR_CHECKPOINT [--host 127.0.0.1
--port 7860]`, then open http://127.0.0.1:7860/ in a browser. It binds to this machine only unless
--host says otherwise (0.0.0.0: every interface; there is no login)."""
import argparse
import sys

from ..runtime.cli import HelpFormatter
from ..runtime.errors import UserError, run_cli, warnings_as_lines
from ..flags import APP_FLAGS, LOAD_FLAGS, add_flags, config_class
from .server import make_server

AppRun = config_class("AppRun", LOAD_FLAGS, APP_FLAGS, doc="A parsed `scdm.app` command line, frozen.")


def create_argparser():
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.app", description=__doc__,
                                formatter_class=HelpFormatter)
    add_flags(p, LOAD_FLAGS)
    add_flags(p, APP_FLAGS)
    return p


def main(argv=None):
    args = AppRun.from_namespace(create_argparser().parse_args(argv))
    from ..pipeline import SCDMPipeline
    with warnings_as_lines():
        pipe = SCDMPipeline.from_checkpoint(args.model_path, device=args.device or None,
                                            precision=args.precision, preset=args.preset,
                                            class_schedule=args.class_schedule or None, use_ema=args.use_ema)
    print(f"note: {pipe.precision_note}", file=sys.stderr, flush=True)
    try:
        server = make_server(pipe, args.host, args.port, queue_size=args.queue, max_steps=args.max_steps)
    except OSError as e:
        raise UserError(f"cannot listen on --host {args.host} --port {args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"scdm painter: http://{host}:{port}/  ({pipe.image_size}x{pipe.image_size}, {pipe.num_classes} classes, "
          f"{'SCDM' if pipe.is_scdm else 'no label diffusion'}, {pipe.device}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server.app.close()  # the running job stops at its next step
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main) or 0)
