"""Runs salesforce-lavis's BLIP captioner for `msa caption --backend lavis`.

lavis 1.0.2 pins transformers 4.26 and numpy<2, which cannot share an environment with
msa's transformers 5, so msa starts this file with the Python of lavis's own environment.
It imports nothing from msa. Protocol, one JSON object per line: msa sends the job
(model_type, num_beams, max_new_tokens, prompt, device, fp16), this answers `ready` or
`error`; then each {"paths": [...]} is answered with {"captions": [...]}. Answers carry
a tag, because lavis prints messages of its own to stdout.
"""

import json
import sys

TAG = "MSA-LAVIS "


def reply(message):
    sys.stdout.write(TAG + json.dumps(message) + "\n")
    sys.stdout.flush()


def main():
    job = json.loads(sys.stdin.readline())
    try:
        import torch
        from lavis.models import load_model_and_preprocess
        from PIL import Image
    except ImportError as err:
        reply({"error": f"cannot import lavis with {sys.executable} ({err})"})
        return 1
    try:
        model, vis_processors, _ = load_model_and_preprocess(
            name="blip_caption", model_type=job["model_type"], is_eval=True, device=job["device"])
    except Exception as err:  # unknown model type, no checkpoint offline: tell msa, which tells the user
        reply({"error": f"lavis could not load blip_caption/{job['model_type']} ({type(err).__name__}: {err})"})
        return 1
    if job["prompt"] is not None:  # lavis conditions on model.prompt and cuts it from each caption
        model.prompt = job["prompt"]
        model.prompt_length = len(model.tokenizer(model.prompt).input_ids) - 1
    if job["fp16"]:
        model.half()
    reply({"ready": True})
    for line in sys.stdin:
        paths = json.loads(line)["paths"]
        images = torch.stack([vis_processors["eval"](Image.open(p).convert("RGB")) for p in paths])
        images = images.to(job["device"], torch.float16 if job["fp16"] else torch.float32)
        with torch.inference_mode():
            # max_length counts the prompt's tokens in lavis; min_length as one new token, like greedy HF.
            captions = model.generate({"image": images}, use_nucleus_sampling=False, num_beams=job["num_beams"],
                                      max_length=model.prompt_length + job["max_new_tokens"],
                                      min_length=model.prompt_length + 1)
        reply({"captions": [c.strip() for c in captions]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
