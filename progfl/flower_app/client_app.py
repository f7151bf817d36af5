import progfl.device_runtime.flower; app = progfl.device_runtime.flower.app  # the ClientApp lives in the installed progfl package
