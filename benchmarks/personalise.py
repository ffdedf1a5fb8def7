"""Textual inversion and DreamBooth on the shipped emoji model, measured before and after with our CLIP.

Concepts the model never saw: emoji families held out of its training (four skin-tone variants of
one emoji each) and, as a second domain, four crops of one held-out photograph.

- Textual inversion (`minidiffusion textual-inversion --pretrained emoji`, `--ti-steps` steps): for
  each concept, `--n` images of "an emoji of <init word>" (before) and of "an emoji of <token>"
  (after), each scored by CLIP image similarity: the mean cosine between our CLIP image tower's
  embeddings of the generated and the concept images (the concept against itself is the ceiling,
  random held-out emoji against the concept the floor).
- DreamBooth (`minidiffusion dreambooth --pretrained emoji`, `--db-steps` steps), on the first
  concept, with prior preservation (weight 1, `--class-images` images the model drew itself) and
  without (weight 0). Subject fidelity: image similarity of "a sks <class>" to the subject; prompt
  fidelity: CLIP score of "a sks <class>: dark skin tone"-style prompts against the caption of the
  real emoji they ask for ("superhero: dark skin tone"; the real emoji's own score is the
  reference); language drift: "a <class>" before and after, its similarity to the subject (rises
  when the class becomes the subject) and to the base model's own "a <class>" images with the
  same seeds (falls when the class forgets what it meant).

    python benchmarks/personalise.py --clip runs/emoji-clip --out runs/personalise --plot docs/personalise.png

Prints markdown tables and writes JSON (and with --plot one PNG: a row per condition).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from minidiffusion.data.emoji import load_emoji, variant_families
from minidiffusion.data.images import save_labelled_grid, to_pil, uint8_to_float
from minidiffusion.data.photos import find_photos, photo_split, random_crops
from minidiffusion.metrics.clip_score import clip_score, image_embeddings
from minidiffusion.pipelines.text import load_clip
from minidiffusion.pipelines.text_to_image import TextToImage

# held-out emoji families (names of their first member) and the init word / class word for each
EMOJI_CONCEPTS = (("superhero", "person"), ("woman farmer", "woman"), ("pinching hand", "hand"))
PHOTO_INIT = "tree"
MODIFIERS = (": dark skin tone", ": light skin tone", ": medium skin tone")  # the subject's own variants


def cli(*args: str) -> float:
    """Run `minidiffusion ARGS` and return its wall-clock seconds; fail loudly with its output."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "minidiffusion", *args, "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"minidiffusion {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.time() - start


def emoji_concept(test, families, first_name: str) -> torch.Tensor:
    """Return the four members of the held-out family whose first member is `first_name`, uint8 [4, 3, S, S]."""
    idx = [i for i, name in enumerate(test.names) if name == first_name]
    if not idx:
        raise SystemExit(f"no held-out emoji named {first_name!r}: the test split changed; pick another concept")
    members = (families == families[idx[0]]).nonzero().flatten()[:4]
    return test.images[members]


def photo_concept(size: int) -> torch.Tensor:
    """Return four crops (uint8 [4, 3, S, S]) of the first held-out photograph."""
    _, test = photo_split(find_photos())
    return random_crops(test[:1], 4, size=size, seed=0, scale=(0.3, 0.6))


def write_folder(images: torch.Tensor, folder: Path) -> Path:
    """Write uint8 images [N, 3, S, S] as PNGs into folder; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        to_pil(uint8_to_float(img)).save(folder / f"{i}.png")
    return folder


def similarity(clip, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Return the mean cosine (x100) between CLIP embeddings of images and of reference images (both in [-1, 1])."""
    return float(100 * (image_embeddings(clip, images) @ image_embeddings(clip, reference).T).mean())


def self_similarity(clip, images: torch.Tensor) -> float:
    """Return the mean cosine (x100) between the CLIP embeddings of different images of one set (the ceiling)."""
    emb = image_embeddings(clip, images)
    sim, n = emb @ emb.T, len(images)
    return float(100 * (sim.sum() - sim.diagonal().sum()) / (n * n - n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="runs/emoji-clip", help="a `train emoji-clip` run: the image tower that scores")
    p.add_argument("--n", type=int, default=16, help="images per prompt and condition")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--ti-steps", type=int, default=500)
    p.add_argument("--db-steps", type=int, default=300)
    p.add_argument("--class-images", type=int, default=100)
    p.add_argument("--out", default="runs/personalise")
    p.add_argument("--json", default="benchmarks/results/personalise.json")
    p.add_argument("--plot", default=None, help="PNG: concept, before, after, DreamBooth rows")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip, _ = load_clip(args.clip)
    base = TextToImage.from_pretrained("emoji")
    size = base.cfg.image_size
    test = load_emoji("test")
    families = variant_families(test.codes, test.names)
    tokenizer = load_clip(args.clip)[1]

    concepts = {name: (emoji_concept(test, families, name), init) for name, init in EMOJI_CONCEPTS}
    concepts["photo"] = (photo_concept(size), PHOTO_INIT)
    pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))[:64]
    random_emoji = uint8_to_float(test.images[pick])

    def draw(pipe, prompt: str) -> torch.Tensor:
        return pipe(prompt, n=args.n, steps=args.steps, seed=0, precision="fp32")

    ti_rows, grid_rows = [], []
    per_row = min(4, args.n)  # images per row of the picture
    for k, (name, (images, init)) in enumerate(concepts.items()):
        folder = write_folder(images, out / f"concept-{k}")
        emb = out / f"ti-{k}.safetensors"
        token = f"<concept-{k}>"
        seconds = cli("textual-inversion", "--pretrained", "emoji", "--images", str(folder), "--token", token,
                      "--init-word", init, "--steps", str(args.ti_steps), "--out", str(emb))
        reference = uint8_to_float(images)
        before = draw(base, f"an emoji of {init}")
        pipe = TextToImage.from_pretrained("emoji")
        pipe.load_embedding(emb)
        after = draw(pipe, f"an emoji of {token}")
        row = {"concept": name, "init_word": init, "ti_steps": args.ti_steps, "ti_seconds": round(seconds, 1),
               "embedding_bytes": emb.stat().st_size,
               "before": similarity(clip, before, reference), "after": similarity(clip, after, reference),
               "ceiling": self_similarity(clip, reference), "floor": similarity(clip, random_emoji, reference)}
        ti_rows.append(row)
        print(row, flush=True)
        if k == 0:
            grid_rows += [reference[:per_row], before[:per_row], after[:per_row]]

    subject_name, (subject, class_word) = next(iter(concepts.items()))
    subject_dir = out / "concept-0"
    reference = uint8_to_float(subject)
    subject_prompt, class_prompt = f"a sks {class_word}", f"a {class_word}"
    fidelity = [(f"{subject_prompt}{m}", f"{subject_name}{m}") for m in MODIFIERS]  # (prompt, real caption)

    def prompt_fidelity(pipe) -> float:
        return sum(clip_score(clip, tokenizer, draw(pipe, q), [c] * args.n) for q, c in fidelity) / len(fidelity)

    real = {name: uint8_to_float(test.images[i])[None] for i, name in enumerate(test.names)}
    reference_score = sum(clip_score(clip, tokenizer, real[c], [c]) for _, c in fidelity if c in real) / max(
        1, sum(c in real for _, c in fidelity))
    base_class = draw(base, class_prompt)
    grid_rows.append(base_class[:per_row])
    db_rows = [{"model": "base (before)", "subject": similarity(clip, draw(base, subject_prompt), reference),
                "prompt": prompt_fidelity(base),
                "class_to_subject": similarity(clip, base_class, reference),
                "class_to_base_class": similarity(clip, base_class, base_class), "seconds": 0.0}]
    for label, weight in (("DreamBooth, prior weight 1", "1"), ("DreamBooth, no prior", "0")):
        run = out / f"dreambooth-{weight}"
        shutil.rmtree(run, ignore_errors=True)
        extra = ["--class-images", str(args.class_images)] if weight != "0" else []
        seconds = cli("dreambooth", "--pretrained", "emoji", "--images", str(subject_dir), "--token", "sks",
                      "--class-word", class_word, "--steps", str(args.db_steps), "--prior-weight", weight,
                      *extra, "--out", str(run))
        pipe = TextToImage.from_run(run)
        sks, cls = draw(pipe, subject_prompt), draw(pipe, class_prompt)
        row = {"model": label, "subject": similarity(clip, sks, reference), "prompt": prompt_fidelity(pipe),
               "class_to_subject": similarity(clip, cls, reference),
               "class_to_base_class": float(100 * (image_embeddings(clip, cls) * image_embeddings(clip, base_class))
                                            .sum(1).mean()),
               "seconds": round(seconds, 1)}
        db_rows.append(row)
        print(row, flush=True)
        grid_rows += [sks[:per_row], cls[:per_row]]
    db_rows[0]["class_to_base_class"] = 100.0  # the base model's class images against themselves, seed for seed

    print(f"\nTextual inversion ({args.ti_steps} steps, {args.n} images per prompt, CLIP image similarity x100)")
    print("| concept | init word | before (init word) | after (learned token) | concept vs itself | random emoji |"
          " training s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in ti_rows:
        print(f"| {r['concept']} | {r['init_word']} | {r['before']:.1f} | {r['after']:.1f} | {r['ceiling']:.1f} | "
              f"{r['floor']:.1f} | {r['ti_seconds']} |")
    print(f"\nDreamBooth on '{subject_name}' ({args.db_steps} steps; class word {class_word!r}; the real emoji's "
          f"own CLIP score for the prompt-fidelity captions: {reference_score:.1f})")
    print(f"| model | subject fidelity ('{subject_prompt}' vs subject) | prompt fidelity (CLIP score) | "
          f"'{class_prompt}' vs subject (drift up) | '{class_prompt}' vs base's, same seeds | training s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in db_rows:
        print(f"| {r['model']} | {r['subject']:.1f} | {r['prompt']:.1f} | {r['class_to_subject']:.1f} | "
              f"{r['class_to_base_class']:.1f} | {r['seconds']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"n": args.n, "steps": args.steps, "ti_steps": args.ti_steps,
                                           "db_steps": args.db_steps, "class_images": args.class_images,
                                           "textual_inversion": ti_rows, "dreambooth": db_rows,
                                           "prompt_fidelity_reference": reference_score,
                                           "machine": platform.processor() or platform.machine(),
                                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, indent=1))
    if args.plot:
        labels = ["the concept", f"'an emoji of {concepts[subject_name][1]}'", "'an emoji of <concept-0>'",
                  f"base '{class_prompt}'", f"prior: '{subject_prompt}'", f"prior: '{class_prompt}'",
                  f"no prior: '{subject_prompt}'", f"no prior: '{class_prompt}'"]
        save_labelled_grid(torch.cat(grid_rows), labels, args.plot)


if __name__ == "__main__":
    main()
