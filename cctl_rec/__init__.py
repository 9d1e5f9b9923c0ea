"""cctl-rec: CCTL (Collaborative Cross-Domain Transfer Learning, KDD'23) on TorchRec."""

import os

__version__ = "0.1.0"

# Fail early, and in one line, when torch / fbgemm / torchrec do not go together.
# CCTL_REC_SKIP_STACK_CHECK=1 skips it (for tools that only read configs).
if os.environ.get("CCTL_REC_SKIP_STACK_CHECK") != "1":
    from cctl_rec._versions import check_stack as _check_stack

    _check_stack()
