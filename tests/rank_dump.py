"""`python tests/rank_dump.py FLAGS` = `python -m scdm.image_train FLAGS`, plus every rank writing its
own weights at each save (<log_dir>/rank<r>_<step>.pt), so a test can compare the replicas directly."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scdm.runtime import dist_util  # noqa: E402
from scdm.training import train_util  # noqa: E402
from scdm.runtime.errors import run_cli  # noqa: E402
from scdm.image_train import main  # noqa: E402

_save = train_util.TrainLoop.save


def save_every_rank(self):
    torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()},
               self.log_dir / f"rank{dist_util.get_rank()}_{self.step}.pt")
    return _save(self)


train_util.TrainLoop.save = save_every_rank

if __name__ == "__main__":
    run_cli(main)
