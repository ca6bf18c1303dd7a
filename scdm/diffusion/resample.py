"""Timestep samplers for training: uniform, or loss-aware (importance sampling on the loss's
second moment, improved DDPM)."""
import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown --schedule_sampler {name!r}; expected 'uniform' or 'loss-second-moment'")


class ScheduleSampler:
    def weights(self):
        raise NotImplementedError

    def sample(self, batch_size, device):
        """Timesteps (batch,) and importance weights that keep the loss unbiased."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights

    def update_with_local_losses(self, local_ts, local_losses):
        pass


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossSecondMomentResampler(ScheduleSampler):
    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.num_timesteps = diffusion.num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([self.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([self.num_timesteps], dtype=int)

    def weights(self):
        if not (self._loss_counts == self.history_per_term).all():
            return np.ones([self.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather (t, loss) pairs from every rank so that all ranks keep the same history."""
        ts, losses = local_ts.detach().float().cpu(), local_losses.detach().float().cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (ts.tolist(), losses.tolist()))
            pairs = [(t, l) for g_ts, g_ls in gathered for t, l in zip(g_ts, g_ls)]
        else:
            pairs = list(zip(ts.tolist(), losses.tolist()))
        for t, loss in pairs:
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1
