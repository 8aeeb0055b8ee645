"""Hugging Face interop: a run as a ``transformers`` checkpoint, and a Llama / Qwen3 checkpoint as a run.

Both directions read and write the files themselves (``config.json``, safetensors, ``tokenizer.json``), so
neither imports ``transformers``: the ``hf`` extra is only needed to *use* an exported directory.

- ``layout``: how each HF architecture names what a scalevec model has;
- ``export``: fold a run into the class transformers ships for its style, or into ``ScalevecForCausalLM``
  (``remote/``, custom code written into the folder) when a DNP norm has no place in that class;
- ``imports``: read a Llama / Qwen3 directory and retrofit a strategy, measuring what it changes;
- ``tokenizer``: the run's tokenizer as ``tokenizer.json``, and a checkpoint's as the run's.
"""

from scalevec.hf.export import (
    ARCHS,
    custom_config,
    export_blockers,
    export_hf,
    hf_config,
    hf_state_dict,
    prenorm_form,
    site_form,
)
from scalevec.hf.imports import (
    DROPPED_GAIN,
    Imported,
    compare_logits,
    describe_changes,
    import_hf,
    import_run,
    load_hf_state_dict,
    load_prenorm,
    model_config_from_hf,
    read_hf_config,
    read_hf_weights,
)
from scalevec.hf.layout import CUSTOM, IMPORTABLE, LAYOUTS, Layout
from scalevec.hf.tokenizer import export_tokenizer, hf_dir_tokenizer, hf_tokenizer

__all__ = [
    "ARCHS", "CUSTOM", "DROPPED_GAIN", "IMPORTABLE", "LAYOUTS", "Imported", "Layout", "compare_logits",
    "custom_config", "describe_changes", "export_blockers", "export_hf", "export_tokenizer", "hf_config",
    "hf_dir_tokenizer", "hf_state_dict", "hf_tokenizer", "import_hf", "import_run", "load_hf_state_dict",
    "load_prenorm", "model_config_from_hf", "prenorm_form", "read_hf_config", "read_hf_weights", "site_form",
]
