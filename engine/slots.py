"""Step-level batching: images at different steps of different plans share one UNet call.

A `Slot` is one image of a request: its text rows, plan, noise stream and sampler state, all
its own. `tick(engine, slots)` advances every slot by one model evaluation: the slots' rows go
through the UNet together (each row with its own timestep), CFG + rescale and the x0/eps
conversion run in one fused launch per group with per-sample a, s, w and phi, and each slot
then takes its own sampler's update, the same operations `samplers.sample` does, so a slot
ends on the image `Engine.run` gives for it alone (docs/serving.md#the-step-scheduler).

A slot's evaluations are the plan's evaluation points: one per step, two on Heun steps with a
corrector. Slots join and leave between ticks; nothing here depends on which slots share a tick
except the rounding of batch-size-dependent BLAS kernels.
"""
import time
from dataclasses import dataclass, field

import torch

from lumen import kernels

from . import controlnet, deepcache, samplers
from .output import decode


@dataclass(eq=False)
class Slot:
    """One image: inputs on the device, its plan, and where its sampler stands."""

    emb: torch.Tensor  # [2, L, D] ([negative, positive]) when cfg, else [1, L, D]
    added: dict  # SDXL's text_embeds and time_ids, rows like emb
    dp: samplers.DevicePlan
    w: torch.Tensor  # 0-dim fp32 guidance scale
    phi: torch.Tensor  # 0-dim fp32 guidance rescale
    cfg: bool
    x: torch.Tensor  # [1, C, h, w] fp32: the state x_t between steps
    noise: torch.Tensor | None  # [1, S, C, h, w] fp32, None when the plan draws none
    owner: object = None  # whoever runs the slot (the server's job)
    i: int = 0  # steps done
    k: int = 0  # evaluation points done
    x0: torch.Tensor | None = None  # [1, C, h, w] the latest x0 estimate (previews, interrupts)
    state: dict = field(default_factory=dict)  # sampler state: x0_prev; x_hat, eps, x_next
    inpaint: dict = field(default_factory=dict)  # {"cond"} rows like emb, or {"mask", "x0", "eps"}
    cache: tuple | None = None  # DeepCache's (interval, branch id), None when off
    full: tuple = ()  # DeepCache: per evaluation, whether it runs the whole UNet (its schedule)
    control: dict = field(default_factory=dict)  # ControlNet: "image{j}" (rows as its input), "scales"
    guess_mode: bool = False  # ControlNet sees the conditional row only
    kept: tuple | None = None  # DeepCache: (the outputs its last full call kept, its rows there)

    @property
    def steps(self) -> int:
        return self.dp.plan.num_steps

    @property
    def done(self) -> bool:
        return self.i == self.steps

    @property
    def rows(self) -> int:
        """UNet rows per evaluation: 2 with CFG, 1 without."""
        return 2 if self.cfg else 1

    @property
    def shallow(self) -> bool:
        """DeepCache: whether this evaluation runs only the shallow branch (engine.deepcache)."""
        return self.cache is not None and not self.full[self.k]

    @property
    def shape_key(self) -> tuple:
        """What rows sharing a UNet call must agree on: the latent and text shapes, and whether
        the UNet also sees a mask and masked-image latents (a 9-channel inpainting model)."""
        return tuple(self.x.shape[1:]), tuple(self.emb.shape[1:]), "cond" in self.inpaint


def split(engine, request: dict, owner=None) -> list[Slot]:
    """One slot per image of an `Engine.prepare` result (SingDiffusion's hand-over done here)."""
    x_T, noise, emb, cfg = request["x_T"], request["noise"], request["emb"], request["cfg"]
    inpaint = request.get("inpaint") or {}
    n = x_T.shape[0]
    cache = request.get("cache")
    full = () if cache is None else deepcache.schedule(request["dp"].plan, cache[0])
    control = request.get("control") or {}
    guess = bool(request.get("guess_mode")) and bool(control)
    slots = []
    for j in range(n):
        rows = [j, n + j] if cfg else [j]
        x = x_T[j:j + 1]
        emb_j = emb[rows]
        if engine.components.initial_step is not None:
            x = engine.hand_over(x, emb_j, request["w"], cfg, request["dp"])
        own = {"cond": inpaint["cond"][rows]} if "cond" in inpaint else \
            {k: v[j:j + 1] for k, v in inpaint.items()}
        control_rows = rows if cfg and not guess else [j]  # rows of the ControlNet's input
        own_control = {k: v if k == "scales" else v[control_rows] for k, v in control.items()}
        slots.append(Slot(emb_j, {k: v[rows] for k, v in request["added"].items()}, request["dp"],
                          request["w"], request["phi"], cfg, x,
                          None if noise is None else noise[j:j + 1], owner, inpaint=own,
                          cache=cache, full=full, control=own_control, guess_mode=guess))
    return slots


@torch.inference_mode()
def tick(engine, slots: list[Slot], on_call=None, graphs=None) -> list[bool]:
    """One model evaluation for every slot; returns, per slot, whether its x0 is finite.

    on_call(images, seconds), if given, is called after each UNet call and its updates.
    graphs: a GraphCache of step graphs (engine.step_graphs) to replay the model step from.

    Slots are grouped by shape (one UNet call per group, or per timestep where the runner takes
    one timestep per call), then by CFG within a call: [neg rows, pos rows] of the CFG slots,
    then the rows of the others, so each fused launch reads one contiguous slice of the output.
    """
    finite = {}
    groups: dict[tuple, list[Slot]] = {}
    for slot in slots:
        groups.setdefault(slot.shape_key, []).append(slot)
    for group in groups.values():
        for call in calls(engine.runner, group):
            start = time.perf_counter()
            for slot, ok in zip(call, evaluate(engine, call, graphs)):
                finite[id(slot)] = ok
            if on_call is not None:
                on_call(len(call), time.perf_counter() - start)
    return [finite[id(slot)] for slot in slots]


def calls(runner, group: list[Slot]) -> list[list[Slot]]:
    """The UNet calls of one shape group: one, or one per timestep for a runner whose exported
    graph takes a single timestep (onnxruntime, TensorRT)."""
    if getattr(runner, "per_row_timesteps", False):
        return [group]
    by_t: dict[float, list[Slot]] = {}
    for slot in group:
        by_t.setdefault(float(slot.dp.plan.timesteps[slot.k]), []).append(slot)
    return list(by_t.values())


def evaluate(engine, slots: list[Slot], graphs=None) -> list[bool]:
    """One UNet call for `slots` (replayed from a step graph when `graphs` is given), then each
    slot's sampler update; returns, per slot, whether its x0 is finite."""
    ordered = [s for s in slots if s.cfg] + [s for s in slots if not s.cfg]
    x_in = [model_input(s) for s in ordered]
    inputs = StepInputs.gather(ordered, x_in)
    if graphs is None or any(s.cache for s in slots):  # DeepCache's calls run eagerly
        x0, eps = model_step(engine, engine.runner, inputs)
    else:
        from .step_graphs import run_graphed

        x0, eps = run_graphed(engine, graphs, inputs)
    ok = torch.isfinite(x0.flatten(1)).all(1).tolist()  # one host sync per UNet call
    for b, (slot, x) in enumerate(zip(ordered, x_in)):
        update(slot, x, x0[b:b + 1], eps[b:b + 1])
    finite = {id(s): f for s, f in zip(ordered, ok)}
    return [finite[id(s)] for s in slots]


@dataclass
class StepInputs:
    """What one model evaluation of n images reads, CFG images first; per image unless noted."""

    n_cfg: int  # images with CFG (they come first)
    x: torch.Tensor  # [n, C, h, w] fp32 model inputs
    t: torch.Tensor  # [n] timesteps
    emb: torch.Tensor  # [n + n_cfg, L, D] rows: [neg (CFG images), pos (CFG images), the others]
    added: dict  # SDXL's text_embeds and time_ids, rows like emb
    a: torch.Tensor  # [n] fp32 sqrt(abar)
    s: torch.Tensor  # [n] fp32 sqrt(1 - abar)
    w: torch.Tensor  # [n] fp32 guidance scale
    phi: torch.Tensor  # [n] fp32 guidance rescale
    cond: torch.Tensor | None = None  # [n + n_cfg, 5, h, w] a 9-channel UNet's mask and masked image
    owners: list | None = None  # with DeepCache or ControlNet: per row, (its slot, the slot's row: 0 or 1)
    control: dict | None = None  # ControlNet per row, for a step graph (dense_control's inputs)

    @classmethod
    def gather(cls, slots: list[Slot], x_in: list[torch.Tensor]) -> "StepInputs":
        """The inputs of slots (CFG slots first) at their current evaluation points."""
        n_cfg = sum(s.cfg for s in slots)
        rows = [(s, 0) for s in slots[:n_cfg]] + [(s, s.rows - 1) for s in slots]

        def per_image(values):
            return torch.stack(values)
        return cls(n_cfg, torch.cat(x_in), per_image([s.dp.timesteps[s.k] for s in slots]),
                   torch.cat([s.emb[r:r + 1] for s, r in rows]),
                   {k: torch.cat([s.added[k][r:r + 1] for s, r in rows]) for k in slots[0].added},
                   per_image([s.dp.a[s.k] for s in slots]), per_image([s.dp.s[s.k] for s in slots]),
                   per_image([s.w for s in slots]), per_image([s.phi for s in slots]),
                   torch.cat([s.inpaint["cond"][r:r + 1] for s, r in rows])
                   if "cond" in slots[0].inpaint else None,
                   rows if any(s.cache or s.control for s in slots) else None)

    def args(self) -> tuple:
        return (self.x, self.t, self.emb, self.added, self.a, self.s, self.w, self.phi, self.cond,
                self.control)

    def dense_control(self) -> dict | None:
        """The ControlNet inputs of every row, for a call whose structure a step graph fixes:
        per ControlNet j any row uses, "image{j}" [rows, 3, H, W] and "scale{j}" [rows] fp32;
        "guess" [rows] fp32, 1 for the rows of guess-mode images. A row that does not use
        ControlNet j, and the unconditional row of a guess-mode image, gets scale 0 (and a zero
        image): its residuals are zero. None without ControlNet. Built from device tensors
        only: no host copy, no sync."""
        if self.owners is None:
            return None
        uses = [controlnet.used(slot.control) for slot, _ in self.owners]
        used = sorted({j for js in uses for j in js})
        if not used:
            return None
        some = next(slot for (slot, _), js in zip(self.owners, uses) if js)
        zero = some.control["scales"].new_zeros(())
        control = {"guess": torch.stack([zero + 1 if slot.guess_mode else zero
                                         for slot, _ in self.owners])}
        for j in used:
            blank = torch.zeros_like(next(slot.control[f"image{j}"][:1]
                                          for (slot, _), js in zip(self.owners, uses) if j in js))
            images, scales = [], []
            for (slot, row), js in zip(self.owners, uses):
                on = j in js and not (slot.guess_mode and slot.cfg and row == 0)
                images.append(slot.control[f"image{j}"][:1] if on else blank)
                scales.append(slot.control["scales"][slot.k, j] if on else zero)
            control[f"image{j}"] = torch.cat(images)
            control[f"scale{j}"] = torch.stack(scales)
        return control

    @property
    def device(self) -> torch.device:
        return self.x.device


def model_step(engine, runner, inputs: StepInputs, nets: tuple | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) [n, C, h, w] fp32: the UNet call over every row, then CFG + rescale and the
    x0/eps conversion as one fused launch per group, with per-sample scalars. No host sync, so
    a step graph captures it (engine.step_graphs). nets: the ControlNet runners (default the
    engine's; a step graph holds its own)."""
    nc, x, t = inputs.n_cfg, inputs.x, inputs.t
    x_in = x.to(engine.dtype)
    sample = torch.cat([x_in[:nc], x_in[:nc], x_in[nc:]])
    t_rows = torch.cat([t[:nc], t[:nc], t[nc:]])
    if not getattr(runner, "per_row_timesteps", False):
        t_rows = t_rows[0]  # calls() gave this call one timestep
    if inputs.control is not None:  # a step graph's fixed structure: every row, every net used
        residuals = dense_control_call(engine, inputs, sample, t_rows, nets)
    else:
        residuals = control_call(engine, inputs, sample, t_rows) if inputs.owners else {}
    if inputs.cond is not None:  # a 9-channel inpainting UNet: [latents, mask, masked image]
        sample = torch.cat([sample, inputs.cond], dim=1)
    if inputs.owners is not None and any(s.cache for s, _ in inputs.owners):
        m = deep_call(engine, runner, inputs, sample, t_rows, residuals)
    else:
        m = runner(sample, t_rows, inputs.emb, **residuals, **inputs.added)
    prediction_type, parts = engine.config.prediction_type, []
    for cfg, rows, images in ((True, slice(0, 2 * nc), slice(0, nc)),
                              (False, slice(2 * nc, None), slice(nc, None))):
        if x[images].shape[0]:
            parts.append(kernels.guided_x0_eps(
                m[rows], x[images], inputs.a[images], inputs.s[images], inputs.w[images],
                inputs.phi[images], prediction_type, cfg))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def control_call(engine, inputs: StepInputs, sample, t_rows) -> dict:
    """The ControlNet residuals of a call's rows: per ControlNet and guess mode, one call over
    the rows whose images use it (each with its own control image, timestep and scale at its
    own evaluation point), summed into zeros for every row; {} when no row uses one."""
    groups: dict = {}  # (ControlNet j, guess mode) -> [(row, slot)]
    for r, (slot, j_row) in enumerate(inputs.owners):
        if not slot.guess_mode or not slot.cfg or j_row == 1:  # guess mode: conditional rows only
            for j in controlnet.used(slot.control):
                groups.setdefault((j, slot.guess_mode), []).append((r, slot))
    if not groups:
        return {}
    nets, down, mid = engine.control_runners, None, None
    for (j, guess), members in groups.items():
        rows = [r for r, _ in members]
        index = torch.tensor(rows, device=sample.device)
        image = torch.cat([slot.control[f"image{j}"][:1] for _, slot in members])  # rows share it
        scale = torch.stack([slot.control["scales"][slot.k, j] for _, slot in members])
        t = t_rows[index] if t_rows.ndim else t_rows  # exported runners: one timestep a call
        d, m = controlnet.run(nets[j], sample[index], t, inputs.emb[index],
                              {k: v[index] for k, v in inputs.added.items()}, image, scale, guess)
        if down is None:
            down = [x.new_zeros((sample.shape[0], *x.shape[1:])) for x in d]
            mid = m.new_zeros((sample.shape[0], *m.shape[1:]))
        for total, x in zip(down, d):
            total.index_add_(0, index, x)
        mid.index_add_(0, index, m)
    return {"down": down, "mid": mid}


def dense_control_call(engine, inputs: StepInputs, sample, t_rows,
                       nets: tuple | None = None) -> dict:
    """control_call's residuals as one call per ControlNet over every row of the call, each row
    weighted by its own scale (zero for a row that does not use the ControlNet): no grouping
    on the host, so a step graph captures it. Equal to control_call's up to rounding."""
    nets = nets if nets is not None else engine.control_runners
    control, down, mid = inputs.control, None, None
    for j in controlnet.used(control):
        d, m = controlnet.run(nets[j], sample, t_rows, inputs.emb, inputs.added, control[f"image{j}"],
                              control[f"scale{j}"], control["guess"])
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return {"down": down, "mid": mid}


def deep_call(engine, runner, inputs: StepInputs, sample, t_rows, residuals: dict) -> torch.Tensor:
    """The UNet output of a call whose rows use DeepCache: one call for the rows at a full step
    (and those without DeepCache), one per branch for the rows at a shallow step, each row
    reading its own image's kept features. Rows of different phases split rather than all
    running the full UNet: fewer FLOPs for the same image (docs/serving.md#the-step-scheduler)."""
    groups: dict = {}  # None: full; else the branch id of the shallow rows
    for r, (slot, _) in enumerate(inputs.owners):
        groups.setdefault(slot.cache[1] if slot.shallow else None, []).append(r)
    m = None
    cached, switch = runner.cached()
    with switch.lock:
        try:
            for branch, rows in groups.items():
                switch.kept.clear()
                if branch is None:  # full: keep what the shallowest branch of these images reuses
                    branches = [inputs.owners[r][0].cache[1] for r in rows if inputs.owners[r][0].cache]
                    switch.set("full" if branches else None, min(branches, default=0))
                else:
                    switch.set("shallow", branch)
                    switch.kept.update(deepcache.rows_of(switch.reused(), [
                        (slot.kept[0], slot.kept[1][j]) for slot, j in (inputs.owners[r] for r in rows)]))
                if len(groups) == 1:
                    out = cached(sample, t_rows, inputs.emb, **residuals, **inputs.added)
                else:
                    index = torch.tensor(rows, device=sample.device)
                    own = {"down": [d[index] for d in residuals["down"]],
                           "mid": residuals["mid"][index]} if residuals else {}
                    out = cached(sample[index], t_rows[index], inputs.emb[index], **own,
                                 **{k: v[index] for k, v in inputs.added.items()})
                if switch.mode == "full":
                    keep(inputs.owners, rows, dict(switch.kept))
                if len(groups) == 1:
                    return out
                if m is None:
                    m = out.new_empty((sample.shape[0], *out.shape[1:]))
                m[index] = out
        finally:
            switch.set(None)
            switch.kept.clear()
    return m


def keep(deep: list, rows: list[int], kept: dict) -> None:
    """After a full call over `rows`: each cached image holds its rows' positions in `kept`."""
    where: dict = {}
    for position, r in enumerate(rows):
        slot, j = deep[r]
        where.setdefault(slot, {})[j] = position
    for slot, positions in where.items():
        if slot.cache is not None:
            slot.kept = (kept, [positions[j] for j in sorted(positions)])


def model_input(slot: Slot) -> torch.Tensor:
    """The point the model sees next: x_t, or for EDM the churned x_hat / the corrector's x."""
    if slot.dp.plan.sampler not in ("euler", "heun"):
        return slot.x
    if "x_next" in slot.state:  # Heun's corrector evaluation
        return slot.state["x_next"]
    c, i = slot.dp.coef, slot.i
    if slot.noise is None:  # as samplers.sample_edm: no step churns, c[:, 0] == 1
        return slot.x
    return c[i, 0] * slot.x + c[i, 1] * slot.noise[:, i]


def update(slot: Slot, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> None:
    """The slot's sampler update after evaluation k at x, written as samplers' loops write it."""
    plan, c, i, state = slot.dp.plan, slot.dp.coef, slot.i, slot.state
    slot.k += 1
    slot.x0 = x0
    if plan.sampler in samplers.DDIM_FORM:
        slot.x = samplers.ddim_update(x0, eps, None if slot.noise is None else slot.noise[:, i], c[i])
    elif plan.sampler == "dpmpp_2m":
        x0_prev = state.get("x0_prev", x0)  # weight 0 on the first step
        slot.x = c[i, 0] * slot.x + c[i, 1] * x0 + c[i, 2] * x0_prev
        state["x0_prev"] = x0
    elif "x_next" in state:  # Heun: the corrector's evaluation came back
        slot.x = c[i, 4] * state.pop("x_hat") + c[i, 5] * (state.pop("eps") + eps)
        del state["x_next"]
    elif plan.corrector[i]:  # Heun: the step ends after the corrector's evaluation
        state.update(x_hat=x, eps=eps, x_next=c[i, 2] * x0 + c[i, 3] * eps)
        return
    else:
        slot.x = c[i, 2] * x0 + c[i, 3] * eps
    if "mask" in slot.inpaint:  # as Engine.loop's keep: the kept region follows the image
        p = slot.inpaint
        slot.x = samplers.keep_region(slot.x, i, slot.dp, p["mask"], p["x0"], p["eps"])
    slot.i += 1


def finish(engine, slots: list[Slot], output_type: str, final: bool = True):
    """Decode the slots' images in one batch: the final samples, or (final=False) the latest x0
    estimates of slots stopped early (an interrupt)."""
    x = torch.cat([s.x if final else s.x0 for s in slots])
    return decode(x, engine.components, output_type, engine.dtype)
