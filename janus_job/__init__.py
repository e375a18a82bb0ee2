"""janus-train: Kubernetes-native training of JanusVLN-style models."""

import logging as _logging

__version__ = "0.1.0"


class _TorchaoImportNotices(_logging.Filter):
    """transformers' quantizers import torchao in every process once it is installed. torchao then logs a
    warning for each compiled extension this build of torch cannot load (the CUDA ones on a CPU build),
    and torch a deprecation warning for each enum torchao registers with pytree. Float8 training
    (janus_job.models.janusvln.fp8) uses neither; every other message of both loggers passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = str(record.msg)
        extension = message.startswith("Failed to load ") and ".so" in message
        subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
        owner = str(getattr(subject, "__module__", ""))
        enum = "register_constant() on Enum subclasses" in message and owner.startswith("torchao")
        return not (extension or enum or message.startswith("Skipping import of cpp extensions"))


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_TorchaoImportNotices())
