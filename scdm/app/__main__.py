"""Paint a label map, get photos: `python -m scdm.app --model_path RUN_FOLDER_OR_CHECKPOINT [--host 127.0.0.1
--port 7860]`, then open http://127.0.0.1:7860/ in a browser. It binds to this machine only unless
--host says otherwise (0.0.0.0: every interface; there is no login)."""
import argparse
import sys

from ..runtime.cli import HelpFormatter, int_at_least, positive_int
from ..runtime.errors import UserError, run_cli, warnings_as_lines
from ..pipeline import add_model_flags
from .server import QUEUE_SIZE, make_server


def create_argparser():
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.app", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_at_least(0), default=7860, help="port (0: any free one)")
    p.add_argument("--queue", type=positive_int, default=QUEUE_SIZE, help="jobs that may wait behind the running one")
    p.add_argument("--max_steps", type=positive_int, default=None,
                   help="most sampling steps a job may ask for (default: the model's diffusion steps)")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.port > 65535:
        raise UserError(f"--port {args.port}: expected 0..65535")
    from ..pipeline import SCDMPipeline
    with warnings_as_lines():
        pipe = SCDMPipeline.from_checkpoint(args.model_path, device=args.device or None,
                                            precision=args.precision or None, preset=args.preset,
                                            class_schedule=args.class_schedule or None, use_ema=args.use_ema)
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
