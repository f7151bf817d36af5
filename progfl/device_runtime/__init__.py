"""The device side: trains one stage on local data within a memory budget, with numpy + onnxruntime-training; this
folder never imports torch. Boards without ORT training (ARM) train with the torch backends of progfl/device_torch,
which open_stage loads only when chosen. Nothing is imported here, so reading a shard (`shard`) loads no engine.

    device     Device: artifacts + local shard + budget + backend; trains whatever stage a task names
    trainer    train_round: one local round, streamed a micro-batch at a time (LocalData)
    shard      Shard: the local data file (.npz), validated and read by row; read_shard for whole files
    rows       RowReader, write_rows/open_rows: on-disk rows read into reused buffers
    cache      FeatureCache: the frozen prefix's outputs on disk, kept between rounds
    backend    StageBackend (what an engine provides), resolve_backend/open_stage, RuntimeOptions
    ort_backend, ort   the ONNX Runtime engine (and the torch-free import of its training API)
    probe      measure_stage/run_probe: a stage's peak memory and step time; make_profile (`progfl device profile`)
    memory     PhasePeak: peak RSS per phase; transport_mb: what a Flower node's own processes hold
    job        a training or evaluation in a fresh process, so its peak is its own (the Flower ClientApp's jobs)
    flower     the Flower ClientApp (needs flwr)
"""
