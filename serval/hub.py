"""A serval model directory on Hugging Face's terms: the config keys and `preprocessor_config.json`
that transformers' Auto classes read (`serval.hf`), the `README.md` model card with the Hub's
metadata, and `push_to_hub`. Written by `serval.checkpoint.save_model` beside the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MODEL_TYPE = "serval"  # config.json's model_type, the key of the Auto classes
ARCHITECTURE = "ServalForAudioClassification"
HF_CONFIG_KEYS = ("model_type", "architectures")  # written into a serval config.json for transformers
CARD_MARK = "<!-- written by serval, which rewrites this card when it saves the model; delete this line to keep your own -->"


def preprocessor_config(sampling_rate: int = 16000) -> dict:
    """`preprocessor_config.json`: what `AutoFeatureExtractor` builds for a serval model."""
    return {
        "feature_extractor_type": "ServalFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": sampling_rate,
        "padding_value": 0.0,
        "return_attention_mask": True,
    }


def model_card(config: dict, license: str | None = None, extra_tags: list[str] | None = None) -> str:
    """README.md for a model directory: Hugging Face metadata (YAML front matter) and a short card."""
    classes, dims = config.get("classes", []), config.get("dimensions", [])
    trained = [d for d in dims if d in config.get("trained_dimensions", [])]
    untrained = [d for d in dims if d not in trained]  # null in every record
    tags = ["serval", "audio-classification", "speech-emotion-recognition", *(extra_tags or [])]
    name = config.get("name") or "serval model"
    lines = [
        "---",
        "library_name: serval",
        "pipeline_tag: audio-classification",
        f"license: {license or config.get('license') or 'other'}",
        "tags:",
        *[f"- {t}" for t in dict.fromkeys(tags)],
        "---",
        CARD_MARK,
        "",
        f"# {name}",
        "",
        f"Speech emotion recognition: {len(classes)} classes ({', '.join(classes)})"
        + (f" and {', '.join(trained)} scores in [0, 1]." if trained else ".")
        + (f" Its {', '.join(untrained)} outputs were not trained: null in records." if untrained else ""),
        f"Whisper encoder backbone: `{config.get('backbone') or 'included'}`.",
        "",
        "```python",
        "import serval",
        'predictor = serval.load("<this folder or Hub id>")',
        'predictor.predict("clip.wav")  # {"label", "probabilities", "scores", ...}',
        "",
        "import transformers  # importing serval registers it with transformers",
        'transformers.pipeline("audio-classification", model="<this folder>")(samples_at_16khz)',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_hf_files(directory: str | os.PathLike, config: dict, license: str | None = None) -> None:
    """`preprocessor_config.json` and, unless someone has written their own, `README.md` (the card)."""
    from serval.atomic import atomic_write_text

    directory = Path(directory)
    atomic_write_text(
        directory / "preprocessor_config.json",
        json.dumps(preprocessor_config(), indent=2) + "\n",
        overwrite=True,
    )
    card = directory / "README.md"
    old = card.read_text(encoding="utf-8", errors="replace") if card.exists() else None
    if old is None or CARD_MARK in old:
        # a checkpoint saved again keeps the licence its card was given
        kept = next(
            (line[len("license: ") :] for line in (old or "").splitlines() if line.startswith("license: ")),
            None,
        )
        atomic_write_text(card, model_card(config, license or kept), overwrite=True)


def push_to_hub(
    directory: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False
) -> str:
    """Upload a serval model directory to the Hugging Face Hub (needs network access); returns its URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (is this a serval model directory?)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="serval model")
    return f"https://huggingface.co/{repo_id}"
