"""TSKD as a sub-package: node schedule, snapshot memory, attention maps, ConvLSTM, distiller.

``tskd.distill.methods`` imports ``distiller`` to register the method as ``"tskd"``.
"""
