"""Embedding stores: where the embeddings a list names come from, and where --generate writes them.

A store is the project's tree of per-utterance `.npy` files (`(crops, D)` or `(D,)`), a Kaldi
`.scp` with its `.ark` files (WeSpeaker, 3D-Speaker), or a packed store (`*.store`: one
memory-mapped matrix with its index, norms, durations and the B/C speaker embeddings;
m_comb_embs.py writes one beside each tree or `.scp`, and a tree or `.scp` with a fresh packed
store is read from it: every file it was built from unchanged, by its size, mtime and ctime or,
where only a time changed, by a hash of its content). No module here imports the data loader
(m_DataLoader.py reads lists and makes batches over these stores).

Modules, by job:
- `keys`: store keys (`store_key(s)`, `embedding_file`, `AUDIO_SUFFIXES`), the speaker and category
  of a key, the line of a list naming a key, and the one reader of each small side file
  (`read_utt2spk`, `read_utt2dur`, `read_manifest`).
- `arrays`: embedding files -> arrays (`read_npy`, `read_embedding`, `check_embedding`,
  `read_files`), crop means and single-utterance embeddings (`crop_mean(s)`, `reduce_means`,
  `single_utterance_embedding`), and the B/C embedding types (`EMBEDDING_TYPES`,
  `embedding_type_of`, `combine_speaker`).
- `stamps`: the files a store is built from and their stamps (`Sources`: size, mtime_ns,
  ctime_ns of each) and content hashes: speaker folders and files of a tree, `.scp` entries and
  ark files, `store_path_of`.
- `fresh`: a store's record of its sources and the check of it (`check_store`): unchanged
  stamps, else the content hashed again; a verified store records the new stamps.
- `source`: `EmbeddingSource`, what every store answers, and `Utterances`, what it gives.
- `tree`, `kaldi`, `packed`: the three kinds (`TreeSource`, `KaldiSource`, `PackedStore` and the
  packed layout).
- `open`: `open_embeddings` (any kind, by path), `open_store` (a packed store, once per process),
  `fresh_store` (the check, once a minute per process; `forget_freshness`). A tree read from its
  files combines its speakers' B/C from them (stores.tree), never from the `<spk>.npy` files.
- `listcache`: what a normal training list resolves to in a packed store (`resolved_list`: each
  record's row and speaker), kept in the store while the list is unchanged.
- `write`: `StoreBuilder`, `pack_arrays`/`pack_means`, and --generate's writers (`gen_format_of`,
  `gen_target`, `write_embeddings`, `write_kaldi`).
"""
