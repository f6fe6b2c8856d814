import pytest
import torch

from diffusion import GAP_WEIGHT, SAMPLERS, SCHEDULES, SPACINGS, Diffusion, DiffusionConfig, consensus, get_sampler
from model import Estimator, tiny
from timewarp import TimeWarp
from tokenizer import SPECIAL

V = 40


def make(**kw):
    cfg = tiny()
    cfg.vocab_size = V
    torch.manual_seed(0)
    return Diffusion(Estimator(cfg), DiffusionConfig(**kw))


def batch(B=4, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=g)
    lengths = torch.tensor([9, 7, 5, 8])[:B]
    length_mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.where(length_mask, ids, 0)
    cond_mask = (torch.rand(B, L, generator=g) < 0.4) & length_mask
    return ids, length_mask, cond_mask


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_endpoints_and_monotone(name):
    gamma = SCHEDULES[name]
    t = torch.linspace(0, 1, 101)
    g = gamma(t)
    assert 0.99 <= g[0].item() <= 1.0  # (almost) clean at t = 0: sqrt stops at 0.99 by design
    assert g[-1].item() == pytest.approx(0.0, abs=1e-6)  # pure noise at t = 1
    assert (g[1:] < g[:-1]).all()  # strictly less signal as t grows
    # the noise scale of Diffusion keeps both ends and the order
    d = make(schedule=name, noise_scale=2.0)
    g2 = d.gamma(t)
    assert g2[-1].item() == pytest.approx(0.0, abs=1e-6) and (g2[1:] < g2[:-1]).all() and (g2 <= g + 1e-6).all()


@pytest.mark.parametrize("expected", [True, False])
def test_loss_parts_are_finite_and_positive(expected):
    d = make(expected=expected)
    out = d.loss(*batch())
    assert set(out) == {"loss", "mse", "ce", "acc", "ce_each", "gap_ce"}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["ce"].item() == pytest.approx(out["ce_each"].sum().item() / len(out["ce_each"]), rel=1e-5)
    parts = out["mse"].item() + out["ce"].item()  # no gaps of open length here
    if expected:  # plus the output's own MSE (test_expected_estimate_is_the_mixture_of_embeddings)
        assert out["loss"].item() > parts
    else:
        assert out["loss"].item() == pytest.approx(parts, rel=1e-5)


def test_mse_weight_scales_each_rows_mse():
    d = make(self_cond_rate=0.0)
    ids, length_mask, cond_mask = batch()
    run = lambda w: d.loss(ids, length_mask, cond_mask, t=torch.full((4,), 0.5),  # noqa: E731
                           eps=torch.zeros(4, 9, 16), mse_weight=w)
    plain, doubled, none = run(None), run(torch.full((4,), 2.0)), run(torch.zeros(4))
    assert torch.allclose(doubled["mse"], 2 * plain["mse"]) and none["mse"] == 0
    assert torch.allclose(doubled["ce"], plain["ce"])  # the cross-entropy is not weighted


def test_loss_ignores_padding():
    d = make(self_cond_rate=1.0)
    ids, length_mask, cond_mask = batch()
    a = d.loss(ids, length_mask, cond_mask, gen=torch.Generator().manual_seed(3))
    ids2 = torch.where(length_mask, ids, torch.randint(4, V, ids.shape))  # other tokens outside the length
    b = d.loss(ids2, length_mask, cond_mask, gen=torch.Generator().manual_seed(3))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_loss_ignores_predictions_at_context_positions():
    d = make(self_cond_rate=0.0)
    ids, length_mask, cond_mask = batch()
    a = d.loss(ids, length_mask, cond_mask, gen=torch.Generator().manual_seed(3))
    forward = d.model.forward

    def garbage_at_context(*args):
        x0_hat = forward(*args)
        return torch.where(cond_mask[..., None], torch.randn_like(x0_hat) * 100, x0_hat)

    d.model.forward = garbage_at_context
    b = d.loss(ids, length_mask, cond_mask, gen=torch.Generator().manual_seed(3))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_context_is_fed_clean():
    """At context positions the model sees the clean embedding, whatever the noise level."""
    d = make(self_cond_rate=0.0)
    ids, length_mask, cond_mask = batch()
    seen = []
    forward = d.model.forward
    d.model.forward = lambda x_t, x_cond, *rest: seen.append((x_t, x_cond)) or forward(x_t, x_cond, *rest)
    d.loss(ids, length_mask, cond_mask, t=torch.ones(4))
    x_t, x_cond = seen[0]
    x0 = d.model.embeddings()[ids]
    assert torch.allclose(x_t[cond_mask], x0[cond_mask])
    assert torch.allclose(x_cond[cond_mask], x0[cond_mask])
    assert (x_cond[~cond_mask] == 0).all()


@pytest.mark.parametrize("sampler,spacing,guidance", [(s, "uniform", 1.0) for s in sorted(SAMPLERS)]
                         + [("ddim", sp, 1.0) for sp in sorted(SPACINGS)] + [("ddim", "uniform", 2.0)])
def test_infilling_keeps_context(sampler, spacing, guidance):
    d = make()
    ids, length_mask, cond_mask = batch()
    out = d.sample(ids, length_mask, cond_mask, steps=7, sampler=sampler, gen=torch.Generator().manual_seed(0),
                   spacing=spacing, guidance=guidance)
    assert out.shape == ids.shape
    assert torch.equal(out[cond_mask], ids[cond_mask])
    assert (out[~length_mask] == 0).all()
    steps_seen = []
    d.sample(ids, length_mask, cond_mask, steps=3, sampler=sampler, on_step=lambda i, x: steps_seen.append(
        torch.equal(x[cond_mask], ids[cond_mask])), spacing=spacing, guidance=guidance)
    assert steps_seen == [True, True, True]  # fixed from the first step to the last


def rising_warp(floor=0.2):
    """A TimeWarp that has seen a loss flat over t < 0.5 and rising over t > 0.5."""
    w = TimeWarp(bins=20, floor=floor)
    loss = torch.cat([torch.zeros(10), torch.linspace(0.5, 5, 10)])
    for _ in range(400):
        w.update(loss, torch.ones(20))
    return w


@pytest.mark.parametrize("name", sorted(set(SPACINGS) - {"restart"}))
def test_spacings_run_from_noise_to_clean(name):
    ts = SPACINGS[name](10, rising_warp())
    assert ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_warped_spacing_steps_where_the_loss_rises():
    """Each step covers an equal share of the warp's draws: 90% of them fall at t > 0.5 (the rise,
    0.8, and half the floor), so 18 of 20 steps do; the sampler steps at those times."""
    ts = SPACINGS["warped"](20, rising_warp())
    assert abs(ts[18] - 0.5) < 1e-3 and (ts[:18] > 0.5).all()
    assert torch.allclose(SPACINGS["warped"](20, TimeWarp()), SPACINGS["uniform"](20), atol=1e-6)  # no loss seen
    assert torch.equal(SPACINGS["warped"](20, None), SPACINGS["quadratic"](20))  # no warp at all
    d = make(spacing="warped")
    d.warp = rising_warp()
    seen, denoise = [], d.denoise
    d.denoise = lambda *a, **kw: seen.append(a[3][0].item()) or denoise(*a, **kw)
    d.sample(*batch(), steps=20)
    assert torch.allclose(torch.tensor(seen), ts[:-1])


def test_restart_spacing_goes_back_to_the_warps_median():
    """50 steps: a warped first pass of 10 steps, then 20 restarts, each from the warp's median t
    (90% of the draws above 0.5: 0.5 + 0.4 * 0.5 / 0.9) to its lower quartile, then 0."""
    warp = rising_warp()
    ts = SPACINGS["restart"](50, warp)
    assert ts.shape == (51,) and ts[0] == 1 and ts[-1] == 0
    assert torch.equal(ts[:10], SPACINGS["warped"](10, warp)[:-1])
    median, quartile = warp.inverse(torch.tensor([0.5, 0.25]))
    assert abs(median - (0.5 + 0.4 * 0.5 / 0.9)) < 1e-3
    assert torch.equal(ts[10:50], torch.stack([median, quartile]).repeat(20))
    assert (ts[1:] > ts[:-1]).sum() == 20  # the times rise once a restart
    assert torch.equal(SPACINGS["restart"](2, warp), SPACINGS["warped"](2, warp))  # too few steps to restart


@pytest.mark.parametrize("steps", range(1, 13))
def test_restart_spacing_never_repeats_a_time(steps):
    """Any number of steps: steps + 1 times from noise to clean, and no step from a time to itself
    (a first pass of two steps would end at the median, where the first restart goes)."""
    for warp in (rising_warp(), None):
        ts = SPACINGS["restart"](steps, warp)
        assert ts.shape == (steps + 1,) and ts[0] == 1 and ts[-1] == 0 and (ts[1:] != ts[:-1]).all()


def test_a_restart_draws_x_s_afresh_around_the_estimate():
    """Where the times rise, the sampler does not step: x_s ~ q(x_s | x̂0), centred on the last
    estimate with the noise of s, whatever x_t was (a DDPM step there leaves noise of std 1.3)."""
    d = make()
    for p in d.model.parameters():  # a random network, far from the tokens it is shown
        torch.nn.init.normal_(p, std=0.3)
    d.warp = rising_warp()
    ids, length_mask, _ = (x.repeat(16, 1) for x in batch())
    seen, estimates, denoise, interpolate = [], [], d.denoise, d.model.interpolate

    def keep_estimate(*a, **kw):
        out = interpolate(*a, **kw)
        estimates.append(out[0])  # the x̂0 that the step uses
        return out

    d.denoise = lambda *a, **kw: seen.append(a[0]) or denoise(*a, **kw)  # x_t as the network sees it
    d.model.interpolate = keep_estimate
    d.sample(ids, length_mask, torch.zeros_like(length_mask), steps=50, spacing="restart",
             gen=torch.Generator().manual_seed(0))
    ts = SPACINGS["restart"](50, d.warp)
    for j in torch.nonzero(ts[1:-1] > ts[:-2])[:, 0].tolist()[:5]:  # step j + 1 starts at a restart
        gamma = d.gamma(ts[j + 1])
        noise = ((seen[j + 1] - gamma.sqrt() * estimates[j]) / (1 - gamma).sqrt())[length_mask]
        assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_guidance_weights():
    """W = 1 is the plain sampler; W = 0 is the unconditional model, blind to what the context says;
    W = 2 extrapolates away from it, so its fills differ from W = 1's."""
    d = make()
    for p in d.model.parameters():  # a random network whose output depends clearly on its inputs
        torch.nn.init.normal_(p, std=0.3)
    ids, length_mask, cond_mask = batch()
    other = torch.where(cond_mask, torch.randint(4, V, ids.shape, generator=torch.Generator().manual_seed(9)), ids)
    run = lambda x, w: d.sample(x, length_mask, cond_mask, steps=4, gen=torch.Generator().manual_seed(0), guidance=w)  # noqa: E731
    free = length_mask & ~cond_mask
    assert torch.equal(run(ids, 1.0), d.sample(ids, length_mask, cond_mask, steps=4, gen=torch.Generator().manual_seed(0)))
    assert torch.equal(run(ids, 0.0)[free], run(other, 0.0)[free])  # the context's words do not matter
    assert not torch.equal(run(ids, 1.0)[free], run(other, 1.0)[free])  # ... but they do at W = 1
    assert not torch.equal(run(ids, 2.0)[free], run(ids, 1.0)[free])


def test_consensus_counts_agreement_on_the_masked_positions_only():
    # positions 0-1 count: candidate 1 shares a token with each of the others, they one with it alone;
    # on positions 2-3, which do not count, candidates 0 and 2 agree with each other everywhere
    c = torch.tensor([[[1, 2, 7, 6], [1, 3, 8, 9], [4, 3, 7, 6]]])  # (1, 3, 4)
    # a second row: the same candidates reversed, its own mask (positions 2-3), so candidate 0 or 2 wins
    c = torch.cat([c, c.flip(1)])
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert consensus(c, mask).tolist() == [1, 0]
    assert consensus(c, torch.ones_like(mask)).tolist() == [0, 0]  # all positions: the first of the tied pair


def test_consensus_gives_no_credit_for_repeating_the_token_before():
    # candidates 0 and 1 agree on a run "1 1 1"; counted, it would make candidate 0 the pick (5 against
    # candidate 2's 3); uncounted, candidate 2, which agrees on fresh tokens, wins (3 against 2)
    c = torch.tensor([[[5, 1, 1, 1, 4], [5, 1, 1, 1, 6], [5, 2, 3, 1, 4]]])
    mask = torch.tensor([[False, True, True, True, True]])
    assert consensus(c, mask).tolist() == [2]
    # each agrees with the others on one token; the first alone has a repeat, so it loses the tie
    c = torch.tensor([[[1, 1], [1, 2], [3, 1]]])
    assert consensus(c, torch.ones(1, 2, dtype=torch.bool)).tolist() == [1]


@pytest.mark.parametrize("guidance,steps", [(1.0, 4), (2.0, 6)])  # 6 steps: the restart spacing rises once
def test_candidates_keep_the_consensus_of_their_own_draws(guidance, steps):
    """candidates=K samples K texts for each row, exactly as K copies of the row in one batch would,
    and returns, for each row, the one that consensus() picks among them; the context stays."""
    d = make()
    for p in d.model.parameters():  # a random network whose output depends clearly on its inputs
        torch.nn.init.normal_(p, std=0.3)
    ids, length_mask, cond_mask = batch()
    K, (B, L) = 5, ids.shape
    run = lambda *x, **kw: d.sample(*x, steps=steps, gen=torch.Generator().manual_seed(0), guidance=guidance, **kw)  # noqa: E731
    out = run(ids, length_mask, cond_mask, candidates=K)
    many = lambda x: x.repeat_interleave(K, 0)  # noqa: E731
    each = run(many(ids), many(length_mask), many(cond_mask))
    each = each.view(B, K, L)
    pick = consensus(each, length_mask & ~cond_mask)
    assert pick.ne(0).any()  # not merely the first draw of each row
    assert torch.equal(out, each[torch.arange(B), pick])
    assert torch.equal(out[cond_mask], ids[cond_mask]) and (out[~length_mask] == 0).all()
    with pytest.raises(ValueError, match="candidates"):
        d.sample(ids, length_mask, cond_mask, steps=2, candidates=0)


def test_ddim_is_deterministic_for_a_seed():
    d = make()
    ids, length_mask, cond_mask = batch()
    cond_mask = torch.zeros_like(cond_mask)
    run = lambda seed: d.sample(ids, length_mask, cond_mask, steps=5, gen=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="ddim"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="cosine"):
        make(schedule="quadratic")


def test_time_warp_draws_where_the_loss_rises():
    g = torch.Generator().manual_seed(0)
    plain = TimeWarp().draw(64, g, warped=False)
    assert torch.equal((plain.sort().values * 64).floor(), torch.arange(64.0))  # one draw in each stratum
    assert torch.allclose(TimeWarp(bins=20).density(), torch.full((20,), 0.05))  # before any loss: uniform
    w = rising_warp(floor=0.2)
    loss = w.loss.clone()
    t = w.draw(4000, g)
    assert 0 <= t.min() and t.max() < 1
    late = (t >= 0.5).float().mean().item()
    assert abs(late - 0.9) < 0.03  # all the rise (0.8 of the draws) is late; the floor (0.2) spreads evenly
    # the MSE's weights give back what the warp takes: 1 / floor where only the floor draws, 1 where
    # the warp draws more often than uniform draws would
    weight = w.mse_weight(t)
    assert torch.allclose(weight[t < 0.5], torch.tensor(5.0), rtol=1e-3) and (weight[t >= 0.5] == 1).all()
    noisy = loss + torch.tensor([0.0] * 5 + [2.0] + [0.0] * 14)  # one noisy bin makes no spike
    w.loss = noisy
    assert w.density().max() < 0.2


def test_skip_keeps_what_x_t_shows():
    """With skip, x̂0 = √γ x_t + √(1-γ) net: at t = 0 the estimate is x_t whatever the network
    says, at t = 1 the network's output alone. Without skip, always the network's output."""
    d, plain = make(skip=True), make()
    _, length_mask, _ = batch()
    x_t = torch.randn(4, 9, d.model.cfg.embed_dim, generator=torch.Generator().manual_seed(1))
    zero = torch.zeros_like(x_t)
    at = lambda diff, t: diff.denoise(x_t, zero, zero, torch.full((4,), t), length_mask)  # noqa: E731
    net = lambda t: d.model(x_t, zero, zero, torch.full((4,), t), length_mask)  # noqa: E731
    assert torch.allclose(at(d, 0.0), x_t) and not torch.allclose(net(0.0), x_t, atol=0.1)
    assert torch.allclose(at(d, 1.0), net(1.0), atol=1e-6)
    assert torch.allclose(at(plain, 0.0), net(0.0)) and torch.allclose(at(plain, 0.5), net(0.5))
    mid = d.gamma(torch.tensor(0.5))
    assert torch.allclose(at(d, 0.5), mid.sqrt() * x_t + (1 - mid).sqrt() * net(0.5), atol=1e-6)


@pytest.mark.parametrize("special", SPECIAL)
def test_special_tokens_are_never_written(special):
    d = make()
    d.model.forward = lambda x_t, x_cond, x_self, t, mask: d.model.embeddings()[special].expand_as(x_t)
    ids, length_mask, cond_mask = batch()
    out = d.sample(ids, length_mask, cond_mask, steps=3, gen=torch.Generator().manual_seed(0))
    written = out[length_mask & ~cond_mask]
    assert not torch.isin(written, torch.tensor(SPECIAL)).any() and torch.equal(out[cond_mask], ids[cond_mask])


def test_gap_lengths_are_the_median_within_the_bound():
    d = make()
    probs = torch.full((d.model.cfg.max_len,), 1e-9)
    probs[[3, 5, 9]] = torch.tensor([0.3, 0.4, 0.3])
    with torch.no_grad():
        d.model.gap_head.weight.zero_()
        d.model.gap_head.bias.copy_(probs.log())
    ids, length_mask, cond_mask = batch()
    up_to = torch.zeros_like(ids)
    up_to[0, 2], up_to[1, 4], up_to[2, 0] = 64, 4, 2  # the most each of three gaps may take
    k = d.gap_lengths(ids, length_mask, cond_mask | (up_to > 0), up_to, gen=torch.Generator().manual_seed(0))
    assert k[0, 2] == 5 and k[1, 4] == 3 and k[2, 0] == 1  # median; within 1..4 only 3; within 1..2 even: the lower
    assert (k[up_to == 0] == 0).all()
    with torch.no_grad():  # all the mass on 60 tokens: nothing left within 1..up_to, which gets the most allowed
        d.model.gap_head.bias.copy_(torch.where(torch.arange(d.model.cfg.max_len) == 60, 200.0, 0.0))
    k = d.gap_lengths(ids, length_mask, cond_mask | (up_to > 0), up_to, gen=torch.Generator().manual_seed(0))
    assert k[0, 2] == 60 and k[1, 4] == 4 and k[2, 0] == 2


def test_gap_loss_is_the_cross_entropy_at_the_markers():
    """The markers' mean length cross-entropy joins the loss, weighed by GAP_WEIGHT."""
    d = make()  # loss = mse + ce + the gap term (the expected estimate adds one more)
    ids, length_mask, cond_mask = batch()
    gap_length = torch.zeros_like(ids)
    gap_length[0, 3], gap_length[2, 1] = 4, 7
    cond_mask = cond_mask | (gap_length > 0)  # a marker is a context position
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    logits = []
    hook = d.model.gap_head.register_forward_hook(lambda m, inp, out: logits.append(out))
    parts = d.loss(ids, length_mask, cond_mask, gen=g(), self_cond=False, gap_length=gap_length)
    hook.remove()
    each = torch.nn.functional.cross_entropy(logits[0], torch.tensor([4, 7]), reduction="none")
    assert torch.allclose(parts["gap_ce"], each.mean())
    assert torch.allclose(parts["loss"], parts["mse"] + parts["ce"] + GAP_WEIGHT * each.mean())
    assert d.loss(ids, length_mask, cond_mask, gen=g())["gap_ce"] == 0  # no markers, no term
    parts["loss"].backward()
    assert d.model.gap_head.weight.grad.abs().sum() > 0


def test_snapping_steps_with_token_embeddings():
    d = make()
    table = d.model.embeddings()
    fixed = (0.6 * table[5] + 0.4 * table[9]).expand(4, 9, -1)  # between two tokens, nearer token 5
    seen = []
    d.model.forward = lambda x_t, x_cond, x_self, t, mask: (seen.append(x_self.clone()), fixed)[1]
    ids, length_mask, _ = batch()
    for snap in (0.0, 1.0):
        seen.clear()
        d.sample(ids, length_mask, torch.zeros_like(length_mask), steps=2, snap=snap, gen=torch.Generator().manual_seed(0))
        x_self = seen[1][length_mask]  # the first step's estimate, as the second step sees it
        on_token = torch.allclose(x_self, table[5].expand_as(x_self), atol=1e-5)
        assert on_token == (snap == 1.0)  # snapped: token 5's own embedding; else the interpolation


def test_expected_estimate_is_the_mixture_of_embeddings():
    """With `expected`, the MSE is that of softmax(tied logits) @ embeddings: a network
    that points firmly at the right tokens has an MSE near 0 there, whatever the norm of its output,
    and the loss adds its output's own MSE weighed by 1 - γ(t); without it, the output's MSE."""
    ids, length_mask, cond_mask = batch()
    target = length_mask & ~cond_mask
    for scale in (4.0, 0.05):  # sure, then unsure of the right tokens
        d, plain = make(expected=True), make()
        for diff in (d, plain):  # the output: the true tokens' embeddings times `scale`
            diff.model.forward = lambda x_t, x_cond, x_self, t, mask, m=diff.model: scale * m.embeddings()[ids]
        kw = dict(t=torch.full((4,), 0.5), gen=torch.Generator().manual_seed(0), self_cond=False)
        parts, raw = d.loss(ids, length_mask, cond_mask, **kw), plain.loss(ids, length_mask, cond_mask, **kw)["mse"].item()
        mse = parts["mse"].item()
        assert raw == pytest.approx((scale - 1) ** 2, rel=1e-4)  # each coordinate off by (scale - 1) x its unit scale
        with torch.no_grad():
            emb = d.model.embeddings()
            mix = (scale * emb[ids][target] @ d.model.readout().t()).softmax(-1) @ emb
            assert mse == pytest.approx(((mix - emb[ids][target]) ** 2).mean().item(), rel=1e-4)
        assert (mse < 1e-3) == (scale > 1)
        hidden = 1 - d.gamma(torch.tensor(0.5)).item()
        rest = (parts["loss"] - parts["mse"] - parts["ce"] - GAP_WEIGHT * parts["gap_ce"]).item()
        assert rest == pytest.approx(hidden * raw, rel=1e-4)
        # each row at its own t and weight: the extra term weighs each row by its 1 - γ(t) and its weight
        t, w = torch.tensor([0.2, 0.5, 0.7, 0.9]), torch.tensor([1.0, 2.0, 3.0, 4.0])
        parts = d.loss(ids, length_mask, cond_mask, t=t, gen=torch.Generator().manual_seed(0), self_cond=False, mse_weight=w)
        rest = (parts["loss"] - parts["mse"] - parts["ce"] - GAP_WEIGHT * parts["gap_ce"]).item()
        per_row = target.sum(1) * (1 - d.gamma(t)) * w * (scale - 1) ** 2  # h is off by (scale - 1) at every position
        assert rest == pytest.approx((per_row.sum() / target.sum()).item(), rel=1e-4)
