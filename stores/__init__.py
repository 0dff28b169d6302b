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
  ark files.
- `fresh`: a store's record of its sources and the check of it (`check_store`): unchanged
  stamps, else the content hashed again; a verified store records the new stamps.
  `fresh_store`: that check, once a minute per process (`forget_freshness`).
- `source`: `EmbeddingSource`, what every store answers, and `Utterances`, what it gives.
- `tree`, `kaldi`, `packed`: the three kinds, each with its source (`TreeSource`, `KaldiSource`,
  `PackedStore` and the packed layout), its open (`open_tree`, `open_scp`: through the packed
  store while it is fresh; `open_store`: a packed store, once per process), what m_gen_list lists
  of it (`tree_names`, `scp_names`, `store_names`) and, for a tree and a .scp, its freshness
  stamp's hashes (`tree_hash_of`, `scp_hash_of`) and where its packed store lies. A tree read
  from its files combines its speakers' B/C from them, never from the `<spk>.npy` files.
- `kinds`: `KINDS`, one `StoreKind` row per kind (how its path is identified, open, scan, pack,
  --generate's writer, target and written names), and the look-ups `kind_of` (by path),
  `kind_named` (gen_format), `store_path_of`. Every choice that depends on a store's kind goes
  through it.
- `open`: `open_embeddings` (any kind, by path: its row's open).
- `pack`: m_comb_embs.py's packers, `pack_tree` (B/C files and the store, on reader threads) and
  `pack_scp` (streamed speaker by speaker).
- `listcache`: what a normal training list resolves to in a packed store (`resolved_list`: each
  record's row and speaker), kept in the store while the list is unchanged.
- `write`: `StoreBuilder`, `pack_arrays`/`pack_means`, and --generate's writers (`write_tree`,
  `write_kaldi`; `gen_format_of`, `gen_target`, `write_embeddings` dispatch through `kinds`).

Adding a kind (say HDF5): one module with its `EmbeddingSource`, an open (path -> source), a scan
(path -> the utterances as lists name them and their speakers) and a --generate writer, and one
`StoreKind` row in `kinds.KINDS` naming them with the suffix that identifies its paths and where
--generate writes it; a kind that m_comb_embs.py packs names its packer and packed store path too.
Nothing else changes: runs, m_gen_list.py, m_comb_embs.py and --generate dispatch through the row
(tests/test_store_kinds.py adds a `.npz` kind this way).
"""
