"""genq's shared kernel: settings, schema, job states and claims, storage, queue, cli."""
