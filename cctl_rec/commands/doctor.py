"""``cctl-rec doctor``: prints the torch / fbgemm / torchrec stack and whether it is a tested set."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check the installed torch / fbgemm / torchrec",
                       description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cctl_rec._versions import check_stack

    v = check_stack()
    print(f"torch {v['torch']} ({'cuda ' + str(torch.version.cuda) if torch.cuda.is_available() else 'cpu'}), "
          f"{v['fbgemm_dist']} {v['fbgemm']}, torchrec {v['torchrec']}: OK (tested combination)")
    return 0
