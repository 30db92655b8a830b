"""The architecture adapter: everything ccq needs to know about one model family.

An adapter recognises its config.json, turns it into a transformers config and model class,
maps model tensor names to checkpoint tensor names, builds image+text calibration samples
(vision-language families), names its module groups and describes a tiny random model of
the family for tests. The defaults suit any transformers model whose config names its class
in `architectures`; a family overrides only what differs.
"""

from __future__ import annotations

from .checkpoint import CheckpointNames

TRANSIENT_KEYS = ("model_type", "transformers_version", "quantization_config", "_name_or_path")


class Adapter:
    """Defaults for a transformers model family; subclasses set `name`, `model_types` and what differs."""

    name = "generic"
    model_types: tuple[str, ...] = ()
    # (group, fnmatch patterns on module names) checked before the common groups of `policy.GROUPS`
    group_patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # an image column in the calibration data becomes image+text samples (`image_sample`)
    takes_images = False

    def matches(self, raw: dict) -> bool:
        return raw.get("model_type") in self.model_types

    def config_dict(self, raw: dict) -> dict:
        """config.json in the form transformers' config class reads (other flavours converted here)."""
        return raw

    def build_config(self, raw: dict, where: str):
        """The transformers config object of config.json `raw` (`where` names it in errors)."""
        from transformers import CONFIG_MAPPING

        d = self.config_dict(raw)
        model_type = d.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise unknown_architecture(where, model_type, raw.get("architectures"))
        body = {k: v for k, v in d.items() if k not in TRANSIENT_KEYS}
        try:
            return CONFIG_MAPPING[model_type].from_dict(body)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}: not a valid {model_type} config: {str(e).splitlines()[0]}") from None

    def model_class(self, config, where: str = "config.json"):
        """The transformers class named by the config's `architectures`."""
        import transformers

        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None or not hasattr(cls, "_from_config"):
            raise unknown_architecture(where, config.model_type, getattr(config, "architectures", None))
        return cls

    def checkpoint_names(self, source, skeleton) -> CheckpointNames:
        """Model tensor name -> checkpoint tensor, through transformers' conversion mapping."""
        return CheckpointNames(source, skeleton)

    def kv_values_per_token(self, config) -> int:
        """K plus V values one token adds to one attention layer's cache, as transformers allocates it."""
        tc = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return 2 * (getattr(tc, "num_key_value_heads", None) or heads) * head_dim

    def image_sample(self, pixels: dict, text_ids, config) -> dict:
        """One image+text forward batch from the image processor's output `pixels` and the text's
        token ids [n] (vision-language families only)."""
        raise ValueError(f"{self.name} models calibrate on text only")

    def tiny_config(self, tokenizer, layers: int = 2, **overrides):
        """A tiny config of the family (all dims multiples of 16) for tests and `ccq.tiny`."""
        raise NotImplementedError(f"{self.name} has no tiny test model")

    def __repr__(self) -> str:
        return f"<ccq adapter {self.name}>"


def text_ids(tokenizer) -> dict:
    """Vocabulary size (padded to 16) and special-token ids of a tiny tokenizer, as config keywords."""
    return {"vocab_size": -(-len(tokenizer) // 16) * 16, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def unknown_architecture(where: str, model_type, architectures) -> ValueError:
    return ValueError(f"{where}: unsupported architecture (model_type {model_type!r}, architectures "
                      f"{architectures!r} is an unknown architecture to this transformers and to ccq's adapters)")
