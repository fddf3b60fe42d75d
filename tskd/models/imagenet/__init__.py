"""ImageNet models: torchvision's ResNets, unmodified, and mdistiller's MobileNetV1.

Importing this package registers them (family ``imagenet``, 1000 classes by default).
"""

from tskd.models.imagenet import mobilenetv1, resnet  # noqa: F401
