"""Datasets in their real on-disk formats, read by the real readers.

``cifar``: CIFAR-100 through torchvision (verified by manifest or official md5);
``synthetic``: tiny learnable stand-ins written in those formats; ``integrity``:
manifests of hashes and the error types. Submodules are imported on use, so that
``import tskd.data`` stays light (no torchvision).
"""

from tskd.data.integrity import DatasetError, IntegrityError

__all__ = ["DatasetError", "IntegrityError"]
