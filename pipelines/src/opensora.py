"""``OpenSoraPipeline``: text to video with OpenSora 1.2 (STDiT3, its VAE, T5) in diffusers form.

Sampling follows OpenSora 1.2's rectified flow: 30 steps from t = 1 to 0 on a linear grid, moved by
its resolution- and length-dependent timestep transform ``t' = r t / (1 + (r - 1) t)`` with
``r = sqrt(H W / 512^2) * sqrt(frames // 17 * 5)`` (``r = sqrt(H W / 512^2)`` below 17 frames), which is
the shift of diffusers' ``FlowMatchEulerDiscreteScheduler``; guidance 7 against the model's learned
empty caption; fps 24 (120 for a single image) and the pixel size as conditioning; prompts end in
" aesthetic score: 6.5.". The released scripts also clean captions (lower case, URLs and HTML removed);
that step is left to the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import T5EncoderModel, T5TokenizerFast

from ditcache.models import OpenSoraVAE, STDiT3Model

OUTPUT_TYPES = ("pil", "np", "latent")
IMAGE_FPS = 120  # the fps conditioning OpenSora 1.2 gives single images
BASE_RESOLUTION = 512 * 512


def timestep_shift(height: int, width: int, num_frames: int) -> float:
    """OpenSora 1.2's timestep-transform ratio for a video of this pixel size and length (clips shorter
    than 17 frames count as one frame, where the released formula would give 0 and a degenerate schedule)."""
    frames = max(num_frames // 17 * 5, 1)
    return math.sqrt(height * width / BASE_RESOLUTION) * math.sqrt(frames)


@dataclass
class OpenSoraPipelineOutput(BaseOutput):
    """``frames``: one list of PIL images per prompt (``output_type="pil"``), or a
    ``(batch, frames, height, width, 3)`` array in [0, 1] (``"np"``), or latents (``"latent"``)."""

    frames: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor


class OpenSoraPipeline(DiffusionPipeline):
    """Text to video with OpenSora 1.2.

    Components: ``tokenizer`` and ``text_encoder`` (T5 v1.1 XXL for the released model, captions
    padded to the transformer's ``model_max_length``), ``transformer`` (:class:`STDiT3Model`), ``vae``
    (:class:`OpenSoraVAE`) and ``scheduler`` (``FlowMatchEulerDiscreteScheduler``; its shift is set per
    call by the timestep transform).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        tokenizer: T5TokenizerFast,
        text_encoder: T5EncoderModel,
        transformer: STDiT3Model,
        vae: OpenSoraVAE,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features ``(B, 1, L, channels)`` and the token mask ``(B, L)``."""
        tokens = self.tokenizer(
            prompt, max_length=self.transformer.config.model_max_length, padding="max_length",
            truncation=True, add_special_tokens=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        features = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        return features[:, None], mask

    def check_inputs(self, num_frames: int, height: int, width: int, num_inference_steps: int, guidance_scale: float,
                     output_type: str) -> None:
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("num_inference_steps", num_inference_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        factor = self.vae.spatial_compression
        if height < 2 * factor or width < 2 * factor:  # the VAE floors sizes to its factor, as released (426 -> 424)
            raise ValueError(f"`height` and `width` must be at least {2 * factor} pixels, got {height}x{width}.")
        if guidance_scale < 1:
            raise ValueError(f"`guidance_scale` must be >= 1, got {guidance_scale!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}.")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_frames: int = 51,
        height: int = 480,
        width: int = 848,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.0,
        fps: int = 24,
        aesthetic_score: float | None = 6.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> OpenSoraPipelineOutput | tuple:
        self.check_inputs(num_frames, height, width, num_inference_steps, guidance_scale, output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if aesthetic_score is not None:  # OpenSora 1.2 was trained with this suffix and samples with 6.5
            prompts = [p if "aesthetic score:" in p else f"{p} aesthetic score: {aesthetic_score:.1f}." for p in prompts]
        batch, device = len(prompts), self._execution_device
        transformer = self.transformer

        guided = guidance_scale > 1  # guidance 1 is the conditional prediction: no empty-caption half
        copies = 2 if guided else 1
        text, mask = self.encode_prompt(prompts, device)
        text = text.to(transformer.dtype)
        if guided:
            text = torch.cat([text, transformer.null_caption(batch).to(device, transformer.dtype)])
            mask = torch.cat([mask, mask])  # the empty caption attends to as many tokens as its prompt

        shape = (batch, transformer.config.in_channels, *self.vae.latent_size(num_frames, height, width))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape} for this prompt count and video size, got {tuple(latents.shape)}.")
        latents = latents.to(device, torch.float32)

        self.scheduler.set_shift(timestep_shift(height, width, num_frames))
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist(), device=device)
        conditioning = {
            "fps": torch.full((copies * batch,), IMAGE_FPS if num_frames == 1 else fps, device=device),
            "height": torch.full((copies * batch,), float(height), device=device),
            "width": torch.full((copies * batch,), float(width), device=device),
        }
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = latents.repeat(copies, 1, 1, 1, 1).to(transformer.dtype)
            prediction = transformer(model_input, t.expand(copies * batch), text, mask, **conditioning).sample
            velocity = prediction[:, : latents.shape[1]].float()
            if guided:
                velocity_cond, velocity_uncond = velocity.chunk(2)
                velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
            # OpenSora's velocity points from noise to data; diffusers' flow scheduler steps along noise - data.
            latents = self.scheduler.step(-velocity, t, latents).prev_sample

        if output_type == "latent":
            frames = latents
        else:
            video = self.vae.decode(latents.to(self.vae.dtype), num_frames=num_frames)
            video = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()
            frames = video if output_type == "np" else [[PIL.Image.fromarray((f * 255).round().astype(np.uint8)) for f in v] for v in video]
        self.maybe_free_model_hooks()
        return OpenSoraPipelineOutput(frames=frames) if return_dict else (frames,)


def export(frames: list[PIL.Image.Image], path: str | Path, fps: int = 24) -> Path:
    """Write one video's frames to ``path``: ``.gif`` (Pillow) or ``.mp4`` (diffusers' exporter,
    which needs ``imageio`` with ffmpeg or OpenCV)."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    elif path.suffix.lower() == ".mp4":
        from diffusers.utils import export_to_video

        export_to_video(frames, str(path), fps=fps)
    else:
        raise ValueError(f"`path` must end in .gif or .mp4, got {path.name!r}.")
    return path
