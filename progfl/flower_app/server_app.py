import progfl.server.flower; app = progfl.server.flower.app  # the ServerApp lives in the installed progfl package
