"""Where training draws the noise level t: CDCD's time warping. train.py draws t through it and
updates it with the loss; the warped and restart step spacings of diffusion.py read it to sample
where training looked."""
import torch

TIME_DRAWS = ("uniform", "stratified", "warped")  # how training draws t: see TimeWarp


class TimeWarp:
    """Where training draws t: CDCD's time warping (Dieleman et al. 2022, sec. 4.3) on a histogram.

    At small t the tokens are plain to read (on E2E the accuracy is 1.000 for t <= 0.5 after a few
    minutes), so uniform draws of t spend half the training where there is nothing left to learn.
    The warp keeps a moving average of the cross-entropy in each of `bins` bins of t, fits it with
    a curve F(t) that increases with t, and draws t with density proportional to dF/dt: the bins
    where the loss changes fastest, mixed with `floor` of uniform density so that no t is ever
    left out. The draws are stratified: one uniform offset for the whole batch, spread
    evenly over [0, 1) (Kingma et al. 2021's low-discrepancy draws), then mapped through F^-1."""

    def __init__(self, bins: int = 20, floor: float = 0.2, decay: float = 0.98):
        self.floor, self.decay = floor, decay
        self.loss = torch.linspace(0, 1, bins + 1)[1:]  # F linear: uniform draws until measured

    def density(self) -> torch.Tensor:
        """(bins,) probabilities of the bins."""
        # a monotone fit: halfway between the smallest increasing curve above the loss and the
        # largest one below it, so that one noisy bin makes no spike
        fit = (self.loss.cummax(0).values + self.loss.flip(0).cummin(0).values.flip(0)) / 2  # (bins,)
        # how much the loss grows across each bin; the first bin grows as the second does
        rise = fit.diff(prepend=(2 * fit[:1] - fit[1:2]).clamp(max=fit[0])).clamp(min=0)
        rise = rise / rise.sum() if rise.sum() > 0 else torch.full_like(rise, 1 / len(rise))
        return self.floor / len(rise) + (1 - self.floor) * rise

    def draw(self, n: int, gen=None, warped: bool = True) -> torch.Tensor:
        """(n,) times in [0, 1): stratified uniform, then through the warp if `warped`."""
        u = (torch.rand((), generator=gen) + torch.arange(n)) / n  # one offset, n even strata
        u = u[torch.randperm(n, generator=gen)]  # rows come sorted by length: no link to t
        return self.inverse(u).clamp(max=1 - 1e-6) if warped else u

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """F^-1(u): the times t (n,) below which a share u (n,) of the warp's draws fall."""
        density = self.density()
        cdf = torch.cat([density.new_zeros(1), density.cumsum(0)])  # (bins + 1,) at the bin edges
        u = u.to(cdf.device)
        k = torch.searchsorted(cdf, u, right=True).clamp(1, len(self.loss)) - 1  # bin of each u
        inside = (u - cdf[k]) / (cdf[k + 1] - cdf[k]).clamp(min=1e-12)
        return ((k + inside) / len(self.loss)).clamp(0, 1)

    def mse_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) weights for the MSE of rows drawn at warped times t (B,): where the warp draws less
        often than uniform draws would, uniform density over the warp's, else 1. So the MSE at every
        t counts at least as much as with uniform draws, and more where the warp looks more. Without
        them the estimate at low t, where the warp seldom draws, is left imprecise."""
        return (1 / (len(self.loss) * self.density()[self.bin_of(t)])).clamp(min=1)

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        return (t * len(self.loss)).long().clamp(0, len(self.loss) - 1)

    def tally(self, t: torch.Tensor, rows: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """(2, bins) sums and counts, on ce's device, of the cross-entropies `ce` (N,) of positions in
        the rows `rows` (N,) of a batch whose rows were drawn at times `t` (B,): update()'s input."""
        bins = self.bin_of(t.to(ce.device))[rows]
        return torch.stack([torch.zeros(len(self.loss), device=ce.device).index_add_(0, bins, ce.float()),
                            torch.bincount(bins, minlength=len(self.loss)).float()])

    def update(self, sums: torch.Tensor, counts: torch.Tensor):
        """Fold in one step's cross-entropy: (bins,) sums over the positions whose t fell in each
        bin, and their (bins,) counts."""
        seen = counts > 0
        mean = sums[seen] / counts[seen]
        self.loss[seen] = self.decay * self.loss[seen] + (1 - self.decay) * mean
