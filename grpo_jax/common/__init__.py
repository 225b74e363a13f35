"""Host-side helpers every layer may use, with no JAX in them: prompt datasets and their iterators
(data), TensorBoard event files and stopwatches (metrics)."""
