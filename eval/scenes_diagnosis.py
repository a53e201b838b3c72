"""Why the scenes reference draws the named colours but not the named digits: the judge on held-out captions
as they are, with every object's digit made the same (no binding of digits to places needed), and cut to two
objects.

    python -m ditcache.eval.scenes_diagnosis --steps 20

If the digit accuracy stays at the same level when all objects name one digit, the digit's class does not
reach the image at all; if it rose, the model would draw the named digits but in the wrong places.
"""

from __future__ import annotations

import argparse
import random

import torch

from ditcache.eval import digits, scenes, train_scenes


def variants(captions: list[str], seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    same, two = [], []
    for text in captions:
        objects, digit = scenes.parse(text), rng.randrange(10)
        same.append(scenes.caption([scenes.SceneObject(digit, o.colour, o.place) for o in objects]))
        two.append(scenes.caption(objects[:2]))
    return {"as they are": captions, "one digit for all objects": same, "the first two objects": two}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--captions", type=int, default=40)
    args = parser.parse_args(argv)
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(digits.reference_pipeline_path(train_scenes.NAME))
    pipe.set_progress_bar_config(disable=True)
    _, captions = scenes.make_scenes(args.captions, scenes.EVAL_SEED, held_out=True)
    print(f"| captions ({args.captions}, {args.steps} steps) | digit | colour | whole caption |\n|---|---|---|---|")
    with torch.no_grad():
        for name, texts in variants(captions).items():
            verdict = scenes.judge(train_scenes.sample(pipe, texts, args.steps), texts)
            print(f"| {name} | {verdict.digit_accuracy:.3f} | {verdict.colour_accuracy:.3f} | {verdict.prompt_accuracy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
