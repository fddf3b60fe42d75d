"""CIFAR-100 model zoo, state-dict compatible with the CRD (RepDistiller) / mdistiller definitions.

Importing this package registers every architecture (the modules' ``@register_model``
decorators run on import).
"""

from tskd.models.cifar import (  # noqa: F401
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
