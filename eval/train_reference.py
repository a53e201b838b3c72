"""Train ditcache's reference models on scikit-learn's digits, deterministically, on a CPU:

    python -m ditcache.eval.train_reference --out eval/reference_models

Stages (each skipped when its output exists, so an interrupted run goes on where it stopped):
1. ``digits-classifier.safetensors``: the CNN of :mod:`ditcache.eval.digits` (conditional accuracy, digits-FID);
2. a small ``AutoencoderKL`` (32 x 32 RGB to 4 x 16 x 16 latents), shared by both pipelines;
3. ``digits-dit/``: a class-conditional ``DiTTransformer2DModel`` saved as a ``DiTPipeline`` (DDIM);
4. ``digits-flux/``: a text-conditional ``FluxTransformer2DModel`` (2 double- and 2 single-stream blocks)
   with small frozen CLIP and T5 encoders, saved as a ``FluxPipeline`` (flow matching), prompted like
   "a handwritten digit seven";
5. ``digits-scenes/``: FLUX.1 at 256 image tokens drawing several coloured digits where its caption says
   (:mod:`ditcache.eval.train_scenes`, resumable from ``runs/train_scenes``).
Each pipeline folder gets a model card (``README.md``) with the data, architecture, command, seed and
final loss. Both transformers: hidden 128, 4 heads, 64 image tokens, 10% condition dropout for
classifier-free guidance, EMA weights; the DiT predicts noise (DDPM betas), FLUX the flow velocity.
A text-conditional PixArt-alpha of the same size (cross-attention only) did not learn to follow its
prompts in 2000 steps (classifier accuracy at chance), where FLUX's pooled-text modulation did in 400:
hence FLUX as the text-conditional reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import builders, digits, train_scenes

SEED = 0
LATENT_SIZE = 16
NULL_CLASS = 1000  # DiTPipeline's unconditional label
TEXT_TOKENS = 16
TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=6,
                   sample_size=LATENT_SIZE, patch_size=2)


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift by up to 2 pixels: the classifier should not depend on the exact placement."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


def train_classifier(out: Path, steps: int) -> dict:
    images, labels = digits.load_images()
    train_images, train_labels = digits.split(images, labels, test=False)
    test_images, test_labels = digits.split(images, labels, test=True)
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = digits.DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for index in tqdm(_batches(len(train_images), 128, steps, generator), total=steps, desc="classifier"):
        loss = nn.functional.cross_entropy(model(_augment(train_images[index], generator)), train_labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    from safetensors.torch import save_model

    save_model(model.eval(), str(out / "digits-classifier.safetensors"))
    return {"steps": steps, "final_loss": loss.item(), "test_accuracy": digits.accuracy(model, test_images, test_labels)}


def train_vae(steps: int):
    """A small VAE whose latents the transformers learn; its scaling factor makes the latents unit-variance."""
    from diffusers import AutoencoderKL

    images, _ = digits.load_images()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=digits.IMAGE_SIZE, mid_block_add_attention=False,
    )
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for index in tqdm(_batches(len(images), 32, steps, generator), total=steps, desc="vae"):
        x = images[index] * 2 - 1
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = nn.functional.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae, loss.item()


@torch.no_grad()
def _latents(vae) -> torch.Tensor:
    images, _ = digits.load_images()
    return vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor


def _train_denoiser(model, predict, latents: torch.Tensor, steps: int, desc: str, flow: bool = False) -> float:
    """AdamW, EMA of the weights copied in at the end. ``predict(noisy, t, index, drop, generator)`` runs
    the model; the objective is epsilon prediction on DDPM's linear betas, or with ``flow`` rectified
    flow (``x_t = (1 - t) x0 + t noise`` at ``t ~ U(0, 1)``, velocity ``noise - x0``)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    ema = EMAModel(model.parameters(), decay=0.999)
    model.train()
    losses = []
    for index in tqdm(_batches(len(latents), 64, steps, generator), total=steps, desc=desc):
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        if flow:
            t = torch.rand(len(x0), generator=generator)
            noisy, target = torch.lerp(x0, noise, t[:, None, None, None]), noise - x0
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
            noisy, target = scheduler.add_noise(x0, noise, t), noise
        drop = torch.rand(len(x0), generator=generator) < 0.1
        loss = nn.functional.mse_loss(predict(noisy, t, index, drop, generator), target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        ema.step(model.parameters())
        losses.append(loss.item())
    ema.copy_to(model.parameters())
    return sum(losses[-200:]) / len(losses[-200:])


def train_dit(vae, steps: int):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    _, labels = digits.load_images()
    torch.manual_seed(SEED)
    model = DiTTransformer2DModel(**TRANSFORMER, num_embeds_ada_norm=NULL_CLASS)

    def predict(noisy, t, index, drop, _generator):
        return model(noisy, timestep=t, class_labels=torch.where(drop, NULL_CLASS, labels[index])).sample

    loss = _train_denoiser(model, predict, _latents(vae), steps, "dit")
    pipe = DiTPipeline(transformer=model.eval(), vae=vae, scheduler=DDIMScheduler(clip_sample=False))  # latents are not in [-1, 1]
    pipe.register_to_config(id2label={str(i): word for i, word in enumerate(digits.DIGIT_WORDS)})
    return pipe, loss


def train_flux(vae, steps: int):
    """FLUX.1 at small size, without guidance distillation: classifier-free guidance is FluxPipeline's
    ``true_cfg_scale`` with ``negative_prompt=""``. The prompts are encoded by the pipeline's own
    ``encode_prompt``, so training sees exactly what generation feeds the transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _, labels = digits.load_images()
    words = (*builders.PROMPT_WORDS, *digits.DIGIT_WORDS, "number")
    tokenizer, text_encoder = builders.tiny_clip(SEED, words=words)
    tokenizer_2, text_encoder_2 = builders.tiny_t5(SEED, words=words)
    torch.manual_seed(SEED)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes latents / scaling_factor + shift_factor
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=model)
    prompts = [digits.prompt(label, template) for label in range(10) for template in range(len(digits.PROMPT_TEMPLATES))]
    with torch.no_grad():  # every training prompt, and "" for guidance
        text, pooled, text_ids = pipe.encode_prompt(prompt=prompts + [""], prompt_2=None, max_sequence_length=TEXT_TOKENS)
    side = LATENT_SIZE // 2
    image_ids = pipe._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    templates = len(digits.PROMPT_TEMPLATES)

    def predict(noisy, t, index, drop, generator):
        choice = labels[index] * templates + torch.randint(0, templates, (len(index),), generator=generator)
        choice = torch.where(drop, len(prompts), choice)
        packed = pipe._pack_latents(noisy, len(noisy), 4, LATENT_SIZE, LATENT_SIZE)
        velocity = model(hidden_states=packed, timestep=t, pooled_projections=pooled[choice], encoder_hidden_states=text[choice],
                         txt_ids=text_ids, img_ids=image_ids).sample
        return pipe._unpack_latents(velocity, digits.IMAGE_SIZE, digits.IMAGE_SIZE, pipe.vae_scale_factor)

    loss = _train_denoiser(model, predict, _latents(vae), steps, "flux", flow=True)
    model.eval()
    return pipe, loss


MODEL_CARD = """# {name}: a ditcache reference model

{what}

- **Data**: scikit-learn's handwritten digits (1797 8x8 images, all of them), upsampled to 32x32 RGB
  (white on black), labels 0-9.
- **Architecture**: {architecture}; VAE: diffusers `AutoencoderKL` (blocks 16, 32, no attention; 4 latent channels
  at 16x16) trained first on the same images (MSE + 1e-6 KL, batch 32).
- **Training**: {objective}, AdamW lr 5e-4, batch 64, {steps} steps,
  EMA 0.999, 10% condition dropout (guidance), seed {seed}; final loss (mean of the last 200 steps)
  {loss:.4f}; {minutes:.1f} minutes on {device}.
- **Command**: `python -m ditcache.eval.train_reference --out eval/reference_models`
- **Use**: `{use}`
- **Purpose**: quality measurements of caching methods offline (ditcache tests and benchmarks). Not a
  general image model.
"""


def _write_card(folder: Path, **fields) -> None:
    (folder / "README.md").write_text(MODEL_CARD.format(seed=SEED, device="a 2-core CPU", **fields))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(digits.REFERENCE_DIR))
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--dit-steps", type=int, default=3000, help="training steps of the DiT")
    parser.add_argument("--flux-steps", type=int, default=3000, help="training steps of the FLUX transformer")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}

    if not (out / "digits-classifier.safetensors").exists():
        log["classifier"] = train_classifier(out, args.classifier_steps)
    vae_folder = out / "vae"  # removed at the end: each pipeline folder carries its copy
    if (out / "digits-dit" / "vae" / "config.json").exists():
        vae_folder = out / "digits-dit" / "vae"
    elif not (vae_folder / "config.json").exists():
        start = time.time()
        vae, loss = train_vae(args.vae_steps)
        vae.save_pretrained(vae_folder)
        log["vae"] = {"steps": args.vae_steps, "final_loss": loss, "minutes": (time.time() - start) / 60}
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    for name, train, steps, objective, architecture, what, use in (
        ("digits-dit", train_dit, args.dit_steps, "epsilon prediction, DDPM linear betas (1000 steps)", "diffusers `DiTTransformer2DModel`, 6 blocks, hidden 128, 4 heads, patch 2, ada_norm_zero, 1001 class embeddings (0-9 and the null class 1000)",
         "Class-conditional DiT on handwritten digits, used through `DiTPipeline` (DDIM).",
         'DiTPipeline.from_pretrained(path)(class_labels=[7], num_inference_steps=20, guidance_scale=3.0)'),
        ("digits-flux", train_flux, args.flux_steps, "rectified flow (velocity prediction, t ~ U(0, 1))", "diffusers `FluxTransformer2DModel` (FLUX.1 without guidance distillation), 2 double-stream and 2 single-stream blocks, hidden 128, 4 heads, rotary axes (8, 12, 12), 64 image tokens; frozen randomly initialised text encoders: a 2-layer CLIP (pooled, width 32) and a 2-layer T5 (d_model 32, 16 tokens), word-level tokenizers",
         "Text-conditional FLUX.1-style model on handwritten digits (\"a handwritten digit seven\"), used through `FluxPipeline` (flow matching, Euler) with true classifier-free guidance.",
         'FluxPipeline.from_pretrained(path)("a handwritten digit seven", negative_prompt="", true_cfg_scale=3.0, height=32, width=32, num_inference_steps=20, max_sequence_length=16)'),
    ):
        folder = out / name
        if (folder / "model_index.json").exists():
            continue
        start = time.time()
        pipe, loss = train(vae, steps)
        minutes = (time.time() - start) / 60
        pipe.save_pretrained(folder)
        _write_card(folder, name=name, objective=objective, what=what, architecture=architecture, steps=steps, loss=loss, minutes=minutes, use=use)
        log[name] = {"steps": steps, "final_loss": loss, "minutes": minutes}
        log_path.write_text(json.dumps(log, indent=2))
    log_path.write_text(json.dumps(log, indent=2))
    shutil.rmtree(out / "vae", ignore_errors=True)
    train_scenes.main(["--out", str(out)])  # needs digits-flux's VAE; resumes from runs/train_scenes
    print(log_path.read_text())


if __name__ == "__main__":
    main()
