"""Train ``digits-scenes``: FLUX.1 at 256 image tokens, following captions that name several digits, their
colours and their places (``eval.scenes``), on a CPU, deterministically and resumably.

    python -m ditcache.eval.train_reference --out eval/reference_models   # every reference model, this one last
    python -m ditcache.eval.train_scenes --out eval/reference_models       # this one alone

Stages; work in progress lives under ``--work`` (``runs/train_scenes``, ignored by git), so that an
interrupted run, in this session or the next, goes on where it stopped:
1. ``scenes.safetensors``: the training scenes (seeds ``0 ... SCENES - 1``, training digits only), their
   captions' token ids, and the VAE latents;
2. ``vae/``: the digits reference VAE (``digits-flux``'s) fine-tuned on scenes: 64 x 64 RGB to 4 x 32 x 32;
3. ``checkpoint.pt``: the transformer and the T5 encoder trained together, saved every ``CHECKPOINT_EVERY``
   steps with the optimizer and the EMA; the batch of step ``k`` is drawn from seed ``k`` alone, so a resumed
   run is the run that was not interrupted;
4. ``<out>/digits-scenes/``: the ``FluxPipeline`` and its model card, with the judge's accuracy.

The text encoders: a frozen random CLIP gives the pooled vector, and a two-layer T5 (width 64) learns with
the transformer. ``binding_separation`` measures why: how far an encoder moves a caption when two of its
objects swap colours, relative to a different caption. Frozen random encoders barely move it (the words
are the same), so the words' binding must be learnt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import builders, digits, scenes

SEED = 0
NAME = "digits-scenes"
SCENES = 24_000
LATENT_SIZE = scenes.CANVAS // 2
BATCH = 32
CHECKPOINT_EVERY = 200
COOLDOWN = 1500
CALL = {"negative_prompt": "", "true_cfg_scale": 3.0, "height": scenes.CANVAS, "width": scenes.CANVAS,
        "max_sequence_length": scenes.TEXT_TOKENS}
"""How the model is called (true classifier-free guidance); ``num_inference_steps`` is the caller's."""


def build_pipeline(vae):
    """The untrained pipeline: the given VAE, tiny word-level encoders, FLUX.1 with 2 double- and 4 single-stream blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, text_encoder = builders.tiny_clip(SEED, words=scenes.WORDS)
    tokenizer_2, text_encoder_2 = builders.tiny_t5(SEED, words=scenes.WORDS, width=64)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    vae.register_to_config(shift_factor=0.0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def t5_ids(pipe, captions: list[str]) -> torch.Tensor:
    """Token ids as ``FluxPipeline`` gives them to its T5 (padded to ``TEXT_TOKENS``)."""
    return pipe.tokenizer_2(captions, padding="max_length", max_length=scenes.TEXT_TOKENS, truncation=True,
                            return_tensors="pt").input_ids


@torch.no_grad()
def pooled(pipe, captions: list[str]) -> torch.Tensor:
    """CLIP's pooled vectors as ``FluxPipeline`` computes them."""
    return torch.cat([pipe._get_clip_prompt_embeds(captions[i : i + 512]) for i in range(0, len(captions), 512)])


@torch.no_grad()
def binding_separation(encode, captions: list[str]) -> float:
    """Mean over captions of ``|e(c) - e(swapped c)| / |e(c) - e(other)|``: how far the encoding ``encode``
    (captions to ``(n, dim)`` or ``(n, tokens, dim)``, then averaged over tokens) moves when two objects swap
    colours, relative to another caption with as many objects. The transformer sees the text tokens as a set
    (FLUX gives them no positions), so a token average that does not move means the encoder leaves the
    binding of colours to digits unsaid. 0: it cannot tell who is red; about 1: as far apart as any two captions."""
    kept, swapped, others = [], [], []
    for i, text in enumerate(captions):
        objects = scenes.parse(text)
        pair = next(((a, b) for a in range(len(objects)) for b in range(a + 1, len(objects)) if objects[a].colour != objects[b].colour), None)
        if pair is None:  # one colour for all: nothing to swap
            continue
        a, b = pair
        objects[a], objects[b] = (scenes.SceneObject(objects[a].digit, objects[b].colour, objects[a].place),
                                  scenes.SceneObject(objects[b].digit, objects[a].colour, objects[b].place))
        kept.append(text)
        swapped.append(scenes.caption(objects))
        others.append(next(c for c in captions[i + 1 :] + captions[:i] if len(scenes.parse(c)) == len(objects)))
    captions = kept
    encoded = (encode(group).float() for group in (captions, swapped, others))
    base, moved, other = (e.mean(dim=1) if e.ndim == 3 else e for e in encoded)
    return float(((base - moved).norm(dim=-1) / (base - other).norm(dim=-1).clamp_min(1e-12)).mean())


@torch.no_grad()
def _latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE's latents (posterior modes) of ``images`` in [0, 1], unscaled."""
    return torch.cat([vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 256)])


def make_data(work: Path, vae_steps: int):
    """Stage 1 and 2: the scenes, the fine-tuned VAE, and every scene's latents and token ids."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    data_path, vae_folder = work / "scenes.safetensors", work / "vae"
    images = latents = None
    if not (vae_folder / "config.json").exists():
        images, captions = scenes.make_scenes(SCENES, seed=0)
        vae = AutoencoderKL.from_pretrained(digits.reference_pipeline_path(digits.TEXT_MODEL) / "vae")
        generator = torch.Generator().manual_seed(SEED)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=5e-4)
        vae.train()
        bar = tqdm(range(vae_steps), desc="scenes vae")
        for _ in bar:
            x = images[torch.randint(0, SCENES, (16,), generator=generator)] * 2 - 1
            posterior = vae.encode(x).latent_dist
            loss = nn.functional.mse_loss(vae.decode(posterior.sample(generator)).sample, x) + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        latents = _latents(vae.eval(), images)
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        vae.save_pretrained(vae_folder)
        data_path.unlink(missing_ok=True)
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    if not data_path.exists():
        if images is None:
            images, captions = scenes.make_scenes(SCENES, seed=0)
            latents = _latents(vae, images)
        pipe = build_pipeline(vae)
        save_file({"latents": latents * vae.config.scaling_factor, "t5_ids": t5_ids(pipe, captions + [""]),
                   "pooled": pooled(pipe, captions + [""])}, str(data_path))
    return vae, load_file(str(data_path))


def _batch(step: int):
    """The indices, noise, times and guidance drops of step ``step``: from the step alone (resumable)."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
    index = torch.randint(0, SCENES, (BATCH,), generator=generator)
    noise = torch.randn(BATCH, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    drop = torch.rand(BATCH, generator=generator) < 0.1
    return index, noise, t, drop


def train(out: Path, work: Path, steps: int, vae_steps: int) -> dict:
    """All stages; returns the training log entry (also written to the model card)."""
    from diffusers.training_utils import EMAModel

    work.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    vae, data = make_data(work, vae_steps)
    pipe = build_pipeline(vae)
    model, t5 = pipe.transformer, pipe.text_encoder_2
    parameters = [*model.parameters(), *t5.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=0.0)
    ema = EMAModel(parameters, decay=0.999)
    checkpoint_path = work / "checkpoint.pt"
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(saved["transformer"])
        t5.load_state_dict(saved["t5"])
        optimizer.load_state_dict(saved["optimizer"])
        ema.load_state_dict(saved["ema"])
        state = {key: saved[key] for key in state}
    # 200 warm-up steps, constant, then linearly to 0 over the last COOLDOWN steps: a longer run is the
    # shorter one continued until its cool-down starts
    rate = lambda step: 5e-4 * min(1.0, (step + 1) / 200, (steps - step) / COOLDOWN)  # noqa: E731
    image_ids = pipe._prepare_latent_image_ids(1, LATENT_SIZE // 2, LATENT_SIZE // 2, "cpu", torch.float32)
    text_ids = torch.zeros(scenes.TEXT_TOKENS, 3)
    empty = len(data["t5_ids"]) - 1
    _, captions = scenes.make_scenes(300, scenes.EVAL_SEED, held_out=True)
    separation_before = binding_separation(_t5_encoder(build_pipeline(vae)), captions)
    model.train()
    t5.train()
    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc=NAME)
    start = time.time() - state["seconds"]
    for step in bar:
        index, noise, t, drop = _batch(step)
        x0 = data["latents"][index]
        noisy, target = torch.lerp(x0, noise, t[:, None, None, None]), noise - x0
        prompt = torch.where(drop, empty, index)
        text = t5(data["t5_ids"][prompt])[0]
        packed = pipe._pack_latents(noisy, BATCH, 4, LATENT_SIZE, LATENT_SIZE)
        velocity = model(hidden_states=packed, timestep=t, pooled_projections=data["pooled"][prompt],
                         encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids).sample
        loss = nn.functional.mse_loss(pipe._unpack_latents(velocity, scenes.CANVAS, scenes.CANVAS, pipe.vae_scale_factor), target)
        for group in optimizer.param_groups:
            group["lr"] = rate(step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.step(parameters)
        state["losses"].append(loss.item())
        bar.set_postfix(loss=f"{sum(state['losses'][-50:]) / len(state['losses'][-50:]):.4f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            state["step"], state["seconds"] = step + 1, time.time() - start
            partial = checkpoint_path.with_suffix(".tmp")
            torch.save({"transformer": model.state_dict(), "t5": t5.state_dict(), "optimizer": optimizer.state_dict(),
                        "ema": ema.state_dict(), **state}, partial)
            partial.replace(checkpoint_path)
    ema.copy_to(parameters)
    model.eval()
    t5.eval()
    folder = out / NAME
    pipe.save_pretrained(folder)
    _, captions = scenes.make_scenes(300, scenes.EVAL_SEED, held_out=True)
    log = {"steps": steps, "vae_steps": vae_steps, "final_loss": sum(state["losses"][-200:]) / len(state["losses"][-200:]),
           "minutes": state["seconds"] / 60, "binding_separation_t5_frozen": separation_before,
           "binding_separation_t5_trained": binding_separation(_t5_encoder(pipe), captions)}
    return log


def _t5_encoder(pipe):
    return lambda captions: pipe._get_t5_prompt_embeds(captions, max_sequence_length=scenes.TEXT_TOKENS)


MODEL_CARD = """# digits-scenes: a ditcache reference model at 256 image tokens

A text-conditional FLUX.1-style model that draws 2-4 coloured handwritten digits in the quadrants a caption
names ("a red 3 at the top left and a blue 7 at the bottom right"), used through `FluxPipeline` (flow
matching, Euler) with true classifier-free guidance. Made for measuring caching methods offline.

- **Data**: {scenes} scenes of `ditcache.eval.scenes` (64 x 64 RGB, seeds 0-{scenes}, training digits only: four in
  five of scikit-learn's 1797 digits); evaluation uses seeds from 1000000 with the held-out digits.
- **Architecture**: diffusers `FluxTransformer2DModel`, 2 double-stream and 4 single-stream blocks, hidden 128,
  4 heads, rotary axes (8, 12, 12), **256 image tokens** (4 x 32 x 32 latents packed 2 x 2); VAE: the digits
  reference VAE (`AutoencoderKL`, blocks 16, 32) fine-tuned {vae_steps} steps on scenes; text: a frozen random
  2-layer CLIP (pooled, width 32) and a 2-layer T5 (width 64, 32 tokens) **trained with the transformer**,
  word-level tokenizers.
- **Why the T5 is trained**: swapping two objects' colours in a caption moves the frozen random T5's token
  average by {binding_separation_t5_frozen:.3f} of the distance to another caption; after training,
  by {binding_separation_t5_trained:.3f} (`train_scenes.binding_separation`, 300 held-out captions).
- **Training**: rectified flow (velocity, t ~ U(0, 1)), AdamW lr 5e-4 (200 warm-up steps, linearly to 0 over the last 1500), batch {batch},
  {steps} steps, EMA 0.999, 10% caption dropout, seed {seed}; final loss (mean of the last 200 steps)
  {final_loss:.4f}; {minutes:.0f} minutes of training wall-clock on a 2-core CPU (the VAE's included; summed over
  resumed runs, which may have shared the CPU with other work: about 1 s per step alone).
- **Command**: `python -m ditcache.eval.train_reference --out eval/reference_models` (resumable; work in
  `runs/train_scenes/`).
- **Use**: `FluxPipeline.from_pretrained(path)("a red 3 at the top left and a blue 7 at the bottom right",
  negative_prompt="", true_cfg_scale=3.0, height=64, width=64, num_inference_steps=50, max_sequence_length=32)`
- **Judge** (`ditcache.eval.scenes.judge`; uncached, the first {judged} held-out evaluation captions, one image
  each, true guidance 3.0): {judge_lines}
  The judge itself reads real held-out scenes at 96.3% per object, 89.1% per whole caption.{limits}
"""

JUDGED_STEPS = (20, 28, 50)


def judge_model(pipe, count: int = 100) -> dict:
    """The uncached model's judged accuracy at the step counts users run, on ``count`` held-out captions."""
    _, captions = scenes.make_scenes(count, scenes.EVAL_SEED, held_out=True)
    verdicts = {steps: scenes.judge(sample(pipe, captions, steps), captions) for steps in JUDGED_STEPS}
    return {f"judge_{steps}_steps": vars(verdict) for steps, verdict in verdicts.items()} | {"judged": count}


def write_card(folder: Path, log: dict) -> None:
    lines = "; ".join(
        f"{steps} steps: {100 * v['object_accuracy']:.1f}% of objects, {100 * v['prompt_accuracy']:.1f}% of whole captions "
        f"(digit {100 * v['digit_accuracy']:.1f}%, colour {100 * v['colour_accuracy']:.1f}%)"
        for steps in JUDGED_STEPS if (v := log.get(f"judge_{steps}_steps"))
    )
    final = log.get(f"judge_{JUDGED_STEPS[-1]}_steps")
    limits = ""
    if final is not None and final["digit_accuracy"] < 0.9:  # what the card must not leave unsaid
        limits = (f"\n- **Limits**: the named colour is drawn in the named place ({100 * final['colour_accuracy']:.0f}%), but the "
                  f"named digit in only {100 * final['digit_accuracy']:.0f}% of objects (10% by chance): this training "
                  "bound colours and places to the caption, not yet the digits' classes. The model serves fidelity "
                  "measurements (cached against uncached) at 256 tokens; it is not yet a prompt-following model.")
    (folder / "README.md").write_text(MODEL_CARD.format(**log, judge_lines=lines + ".", scenes=SCENES, batch=BATCH, seed=SEED, limits=limits))


@torch.no_grad()
def sample(pipe, captions: list[str], steps: int, batch: int = 20) -> torch.Tensor:
    """Images ``(n, 3, 64, 64)`` in [0, 1] for ``captions``, batch ``i`` from seed ``i``."""
    images = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        call = dict(CALL, negative_prompt=[""] * len(chunk), num_inference_steps=steps, output_type="pt")
        images.append(pipe(chunk, generator=torch.Generator().manual_seed(start // batch), **call).images)
    return torch.cat(images)


def checkpoint_pipeline(work: Path):
    """The pipeline with the EMA weights of the last checkpoint in ``work``: to watch a training in progress."""
    from diffusers import AutoencoderKL

    pipe = build_pipeline(AutoencoderKL.from_pretrained(work / "vae").eval())
    saved = torch.load(work / "checkpoint.pt", weights_only=True)
    parameters = [*pipe.transformer.parameters(), *pipe.text_encoder_2.parameters()]
    for parameter, value in zip(parameters, saved["ema"]["shadow_params"], strict=True):
        parameter.data.copy_(value)
    pipe.transformer.eval()
    pipe.text_encoder_2.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, saved["step"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(digits.REFERENCE_DIR))
    parser.add_argument("--work", default="runs/train_scenes", help="resumable work in progress (ignored by git)")
    parser.add_argument("--steps", type=int, default=9500, help="training steps of the transformer and T5")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--judged", type=int, default=100, help="held-out captions the model card's accuracy is measured on")
    args = parser.parse_args(argv)
    out = Path(args.out)
    log_path = out / "training_log.json"
    entries = json.loads(log_path.read_text()) if log_path.exists() else {}
    if not (out / NAME / "model_index.json").exists():
        entries[NAME] = train(out, Path(args.work), args.steps, args.vae_steps)
        log_path.write_text(json.dumps(entries, indent=2))
    log = entries[NAME]
    if "judged" not in log:  # a stage of its own: the card's accuracy
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(out / NAME)
        pipe.set_progress_bar_config(disable=True)
        log |= judge_model(pipe, args.judged)
        log_path.write_text(json.dumps(entries, indent=2))
    write_card(out / NAME, log)
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
