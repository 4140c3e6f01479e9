"""serval models as transformers classes: `ServalConfig`, `ServalFeatureExtractor` and
`ServalForAudioClassification`, registered with the Auto classes by `serval.hf.register`.

This module imports transformers; nothing on serval's own inference path imports it. The network
and its weights stay serval's: `from_pretrained` reads a serval model directory with
`serval.inference.load` (an encoder saved without its backbone is rebuilt from `config.backbone`,
which transformers' own loader could not do), and `forward` runs serval's features and heads.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, PretrainedConfig, PreTrainedModel, SequenceFeatureExtractor
from transformers.modeling_outputs import SequenceClassifierOutput

from serval.hub import MODEL_TYPE
from serval.inference import Predictor, load
from serval.model import SERConfig, SERModel
from serval.vocab import EMOTIONS, SAMPLE_RATE


class ServalConfig(PretrainedConfig):
    """A serval `config.json` read by transformers: the `SERConfig` fields, and the labels from `classes`."""

    model_type = MODEL_TYPE

    def __init__(self, classes=EMOTIONS, **kwargs):
        kwargs.setdefault("id2label", dict(enumerate(classes)))
        kwargs.setdefault("label2id", {c: i for i, c in enumerate(classes)})
        super().__init__(**kwargs)
        self.classes = list(classes)


class ServalFeatureExtractor(SequenceFeatureExtractor):
    """Passes 16 kHz mono samples through as `input_values` (padded, with an attention mask):
    serval computes its own log-mel inside the model, as in training."""

    model_input_names = ["input_values", "attention_mask"]

    def __init__(self, feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, **kwargs):
        kwargs.setdefault("return_attention_mask", True)
        super().__init__(
            feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs
        )

    def __call__(self, raw_speech, sampling_rate=None, return_tensors=None, **kwargs) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"serval takes {self.sampling_rate} Hz audio, got {sampling_rate} Hz")
        single = isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1
        waves = [np.asarray(w, np.float32).reshape(-1) for w in ([raw_speech] if single else raw_speech)]
        n = max(len(w) for w in waves)
        values = np.zeros((len(waves), n), np.float32)
        mask = np.zeros((len(waves), n), np.int64)
        for i, w in enumerate(waves):
            values[i, : len(w)], mask[i, : len(w)] = w, 1
        return BatchFeature({"input_values": values, "attention_mask": mask}, tensor_type=return_tensors)


class ServalForAudioClassification(PreTrainedModel):
    """A serval model (or ensemble) behind transformers' interface; `logits` are the log of serval's
    (ensemble-averaged) probabilities, so a softmax over them gives serval's probabilities."""

    config_class = ServalConfig
    main_input_name = "input_values"

    def __init__(self, config: ServalConfig, models: list[SERModel] | None = None):
        super().__init__(config)
        if models is None:  # a new, untrained network of the config's shape
            known = set(SERConfig.__dataclass_fields__)
            models = [
                SERModel(SERConfig.from_dict({k: v for k, v in config.to_dict().items() if k in known}))
            ]
        self.members = torch.nn.ModuleList(models)
        self.post_init()

    def _init_weights(self, module):
        pass  # the members are built (and trained) by serval, never initialised here

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """The serval model directory (or Hub id, or ensemble) that `serval.load` reads."""
        predictor = load(pretrained_model_name_or_path, device="cpu")
        if config is None or not isinstance(config, ServalConfig):
            config = ServalConfig(classes=predictor.classes, name=predictor.name)
        return cls(config, list(predictor.models)).eval()

    def forward(self, input_values, attention_mask=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        # serval's own batching and > 30 s pooling, so the numbers are exactly `serval.load(dir)`'s
        predictor = Predictor(list(self.members), device=input_values.device)
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else None
        waves = [
            x[: int(lengths[i])] if lengths is not None else x
            for i, x in enumerate(input_values.float().cpu().numpy())
        ]
        probs, scores = predictor.predict_waveforms(waves)
        probs = torch.from_numpy(probs).to(input_values.device)
        scores = torch.from_numpy(scores).to(input_values.device)
        return SequenceClassifierOutput(logits=probs.clamp_min(1e-12).log(), hidden_states=(scores,))
