"""Readers of the pipeline's inputs. Each names the file and line/row of a bad record and sends it
to the dead-letter output (`deadletter.REJECTED`) with the reason; valid records go on. A corrupt
or truncated file, or a Parquet file with the wrong schema, is dead-lettered under its own name.
Globs and comma-separated lists of paths are accepted, local or on any Beam filesystem (gs://...).

  detection_record.py  one detection: validation, the corpus's region order, the --max-regions cap
  jsonl_parquet.py     detections as JSON Lines or Parquet rows
  vinvl.py             VinVL TSV detections, scene_graph_benchmark's and the Oscar/VinVL layout
  detections.py        ReadDetections: every detections format -> unique, ordered, capped detections
  text.py              ReadCorpus: the text corpus -> unique cleaned sentences
Images are read by pipelines/images.py.
"""
