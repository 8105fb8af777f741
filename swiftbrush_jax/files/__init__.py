"""Files and formats: the file layer, pipeline loading, weight conversion, the diffusers writer, checkpoints, the student record."""
