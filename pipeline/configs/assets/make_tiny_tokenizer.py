"""How tiny_tokenizer/ was made: a 512-token byte-level BPE trained on tiny_corpus.txt (paragraphs of CPython's
standard-library docstrings, PSF licence). Re-run: python pipeline/configs/assets/make_tiny_tokenizer.py"""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

here = os.path.dirname(os.path.abspath(__file__))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([os.path.join(here, "tiny_corpus.txt")], trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                               pad_token="<|pad|>")
fast.save_pretrained(os.path.join(here, "tiny_tokenizer"))
print(len(fast))
