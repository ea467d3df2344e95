"""Training methods: SFT, DPO and ORPO with TRL; rerank and embedding models; merging an adapter."""
