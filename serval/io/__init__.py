"""Inputs and outputs of the batch commands, one module each, nothing done at import.

- `inputs`: what the user names (files, folders, manifests, datasets) as `serval.clip.Clip`s, and reading them;
- `hf_datasets`: local Hugging Face datasets (a `save_to_disk` folder, Parquet files) read with pyarrow;
- `decoder`: the background thread that decodes items ahead of the model;
- `jsonl`: the one resumable JSONL log (predict's output, pseudolabel's progress, eval's cache);
- `formats`: records as json, jsonl, csv or a table;
- `ray_pool`: a Ray cluster's actor pool (`--ray`), shared by predict and pseudolabel.
"""
