"""`fvgpt classify`: classify a folder, a glob or a table of images to Parquet on Ray Data (docs/batch.md).

Modules: inputs (what to classify: folders, globs, Parquet/CSV columns → numbered items), shards (the output folder:
the job record, atomic shards, what a re-run skips), stages (the Ray stages: decode tasks and tower actors, running
fvgpt_runtime.classifier's steps), job (the driver: Ray, the dataset, progress, Ctrl-C), cli (the command).
Ray and pyarrow come with the `batch` extra; nothing here imports torch, open_clip, the exporter or the server.
"""
