"""Input pipelines: record sources (sources.py, image_folder.py) and the Grain pipeline
(pipeline.py). Nothing is imported here so that Grain worker processes stay light."""
