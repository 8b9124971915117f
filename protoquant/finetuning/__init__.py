"""Stage -1 (optional): fine-tune the backbone on the training split, then freeze it.

`finetune(config)` trains the backbone at its last feature map with a new linear layer and writes
weights that load through `backbone.weights` exactly like pretrained ones (`files` describes the
folder); `finetuned_config` points a run config at them.
"""

from protoquant.finetuning.api import finetune, finetune_first, finetuned_config
from protoquant.finetuning.files import FinetuneResult

__all__ = ["FinetuneResult", "finetune", "finetune_first", "finetuned_config"]
