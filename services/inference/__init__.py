"""The inference worker: the engine, the tiered adapter cache and the usage reporter."""
