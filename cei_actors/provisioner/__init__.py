"""The Provisioner: VMs through libcloud, with a registry of deployable types, sites and
credentials (the original's DTRS). See ``logic`` (the pure core), ``actor`` and ``client``."""
