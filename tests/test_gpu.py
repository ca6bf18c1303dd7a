"""GPU checks, for a machine with CUDA: `pytest -m gpu tests/test_gpu.py` (elsewhere, and in the
default run, they are skipped: the suite pins itself to the CPU). The fast paths against the plain
computation, and batch-invariant sampling, on the device users train on."""
import pytest
import torch

from scdm.fast.fast_paths import Autotuner, override
from scdm.diffusion.sampling import sample_loop
from scdm.script_util import create_model_and_diffusion

from conftest import TINY_FLAGS, random_label_map

pytestmark = pytest.mark.gpu


def busy_model(device):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**dict(TINY_FLAGS, timestep_respacing="ddim4"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.autotuner = Autotuner()
    return model.to(device).eval(), diffusion


def test_fast_paths_match_the_plain_computation_on_cuda():
    model, _ = busy_model("cuda")
    x = torch.randn(3, 3, 16, 16, device="cuda")
    y = random_label_map(3, 4, 16, 16).cuda()
    t = torch.tensor([5, 50, 95], device="cuda")
    with torch.no_grad():
        with override(model, enabled=False):
            plain = model(x, t, y=y)
        fast = model(x, t, y=y)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_batch_invariant_sampling_on_cuda():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    model, diffusion = busy_model("cuda")
    y = random_label_map(3, 4, 16, 16)

    def sample(rows):
        gens = [torch.Generator().manual_seed(10 + i) for i in rows]
        return sample_loop(model, diffusion, (len(rows), 3, 16, 16), y[rows], guidance_scale=1.5, sampler="ddim",
                           generators=gens, batch_invariant=True, device="cuda")

    together = sample([0, 1, 2])
    alone = torch.cat([sample([i]) for i in range(3)])
    assert torch.equal(together, alone)
