"""Fine-tune self-supervised speech encoders with a CTC head on LibriSpeech."""
