//! liandan-data: ingest, clean, deduplicate, tokenizer, split and shard, SFT and preference formats.
//!
//! Not built yet: the data pipeline arrives with its own work item. Until then `liandan train`
//! reads a text file as UTF-8 bytes with the byte-level vocabulary of
//! `liandan_worker::tokenizer::ByteTokenizer`.
