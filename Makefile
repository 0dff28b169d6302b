# make demo   - install, then run the whole pipeline on a generated demo corpus (under demo_out/)
# make test   - install, then run the test suite
# make bench  - speed and memory benchmark (under bench_out/)
# make voxceleb VOX1=... VOX2=... CKPT=... [TRIALS=...] - the demo's steps on VoxCeleb (below)
# make lint   - ruff's checks and format check, and mypy on the non-test code (as CI runs it)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DEMO   := demo_out

.PHONY: install install-dev demo demo-data test bench lint voxceleb

# install: what the scripts and the demo run on; install-dev adds the test and lint tools
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps resemblyzer==0.1.4
	touch $@

# The test and lint tools, pinned so that a format or type check gives the same verdict everywhere
DEV_TOOLS := "pytest>=8" ruff==0.17.6 mypy==2.4.1 types-PyYAML==6.0.12.20261122

$(VENV)/.installed-dev: $(VENV)/.installed Makefile
	$(PY) -m pip install -q $(DEV_TOOLS)
	touch $@

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) tests/bench.py --out bench_out

# The demo's steps, each a script run as a user would. Sizes and epochs can be changed, e.g.
# make demo CORPUS_FLAGS="--train_speakers 20" TRAIN_FLAGS="--max_epoch 2" (the tests do so).
# vox_calib (held-out speakers of varied length) validates the training runs, calibrates the
# scores and trains QMF. Each run of DEMO_RUNS is trained once per seed of DEMO_SEEDS (into
# demo_out/exp/<run>_seed<S>) and checked on the full vox_test; the first seed's run is also
# checked on vox_test's SHORT_SECONDS versions (result/check_<S>s.json: EER against duration) and
# against enrolment models of ENROLL_UTTS utterances (result/check_enroll<K>.json, and with
# ENROLL_SHORT-second tests against full-length enrolment check_enroll<K>_<S>s.json). The viewer
# writes the seed table (seeds.txt), the enrolment table and figure (enrolment.txt, .png) and the
# other figures.
CORPUS_FLAGS ?=
# GE2E works on 1.6 s windows: crops of 160 frames keep the demo fast
EMBED_FLAGS  ?= --eval_frames 160 --num_eval 5
TRAIN_FLAGS  ?=
# configs/<run>.yaml; each run's results go to demo_out/exp/<run>_seed<S>
DEMO_RUNS    ?= demo_MyResidualNet
DEMO_SEEDS   ?= 1 2 3
INSTALL      ?= install
# Short test sets: vox_test's first 1 and 2 seconds, checked beside the full length (EER against duration)
SHORT_SECONDS ?= 1 2
# Enrolment models of K utterances (K = 1: single-utterance models on the same test utterances)
ENROLL_UTTS  ?= 1 3 5
ENROLL_SHORT ?= 2
ENROLL_BACKENDS ?= none asnorm plda qmf
# demo-data: the corpus, its embeddings and lists (each step skips what it finds done)
demo-data: $(INSTALL)
	$(PY) tests/demo_corpus.py --out $(DEMO)/audio $(CORPUS_FLAGS)
	for set in vox_train vox_test libri vox_calib; do \
	  $(PY) m_gen_embs.py --model GE2E --db_path $(DEMO)/audio/$$set --embed_dir $(DEMO)/embeddings/$$set $(EMBED_FLAGS) || exit 1; \
	  $(PY) m_comb_embs.py --embed_dir $(DEMO)/embeddings/$$set || exit 1; \
	  $(PY) m_gen_list.py --embed_dir $(DEMO)/embeddings/$$set --filename $$set --list_dir $(DEMO)/lists || exit 1; \
	done
	$(PY) m_gen_list.py --embed_dir $(DEMO)/embeddings/vox_test --filename vox_test --list_dir $(DEMO)/lists \
	  --lists enroll --enroll_utts $(ENROLL_UTTS)
	for s in $(SHORT_SECONDS); do \
	  $(PY) m_gen_embs.py --model GE2E --db_path $(DEMO)/audio/vox_test --embed_dir $(DEMO)/embeddings/vox_test_$${s}s $(EMBED_FLAGS) --max_seconds $$s || exit 1; \
	  $(PY) m_comb_embs.py --embed_dir $(DEMO)/embeddings/vox_test_$${s}s || exit 1; \
	done

demo: demo-data
	for run in $(DEMO_RUNS); do \
	  first=yes; \
	  for seed in $(DEMO_SEEDS); do \
	    this="--config configs/$$run.yaml --seed $$seed --save_path $(DEMO)/exp/$${run}_seed$$seed"; \
	    $(PY) m_trainer.py $$this $(TRAIN_FLAGS) || exit 1; \
	    $(PY) m_trainer.py $$this --check || exit 1; \
	    if [ $$first = yes ]; then \
	      for s in $(SHORT_SECONDS); do \
	        $(PY) m_trainer.py $$this --check --test_path $(DEMO)/embeddings/vox_test_$${s}s \
	          --result_tag $${s}s --test_list_libri "" || exit 1; \
	      done; \
	      for k in $(ENROLL_UTTS); do \
	        enroll="--test_list $(DEMO)/lists/vox_test_enroll$${k}_test_list.txt --enroll_list $(DEMO)/lists/vox_test_enroll$$k.spk2utt"; \
	        $(PY) m_trainer.py $$this --check $$enroll --test_list_libri "" --backends $(ENROLL_BACKENDS) \
	          --result_tag enroll$$k || exit 1; \
	        for s in $(ENROLL_SHORT); do \
	          $(PY) m_trainer.py $$this --check $$enroll --test_list_libri "" --backends $(ENROLL_BACKENDS) \
	            --test_path $(DEMO)/embeddings/vox_test_$${s}s --enroll_path $(DEMO)/embeddings/vox_test \
	            --result_tag enroll$${k}_$${s}s || exit 1; \
	        done; \
	      done; \
	      $(PY) m_trainer.py $$this --generate || exit 1; \
	    fi; \
	    first=no; \
	  done; \
	done
	$(PY) m_viewer.py --save_path $(foreach run,$(DEMO_RUNS),$(foreach seed,$(DEMO_SEEDS),$(DEMO)/exp/$(run)_seed$(seed))) \
	  --out_dir $(DEMO)/plots --dist_list $(DEMO)/lists/vox_test_distribution_list.txt --embed_dir $(DEMO)/embeddings/vox_test

# make voxceleb VOX1=data/voxceleb1/wav VOX2=data/voxceleb2/aac CKPT=baseline_v2_ap.model \
#     [TRIALS="lists/veri_test2.txt lists/list_test_all2.txt"] [VOXOUT=exp_voxceleb]
# The demo's steps on VoxCeleb as distributed, each resuming where it stopped (run it again after
# a stop): VOX1 is the wav folder holding every VoxCeleb1 speaker (dev and test unzipped into one
# wav/, as the E and H lists need: wav/idXXXXX/<video>/<n>.wav), VOX2 VoxCeleb2 dev's aac folder
# (aac/idXXXXX/<video>/<n>.m4a). CKPT: voxceleb_trainer's released ResNetSE34V2 weights
# (baseline_v2_ap.model; CKPT=random: untrained weights, for tests only). TRIALS: official trial
# lists (lists/README.md), checked one by one; their speakers are the test speakers, and the other
# VoxCeleb1 speakers validate and calibrate (none are left with the E or H list: then no
# validation, calibration or QMF). VoxCeleb2 dev trains configs/voxceleb.yaml, whose paths are
# these with VOXOUT=exp_voxceleb. Stages, in order: 1 embeddings (m_gen_embs.py), 2 speaker files
# and packed stores (m_comb_embs.py), 3 lists (m_gen_list.py), 4 training, 5 --check of each
# trial list, 6 --generate, 7 figures and tables (m_viewer.py). Ends with
# <VOXOUT>/voxceleb/result/check.json (the first list; check_<name>.json each other), results.md
# and results.tex (the table) and the figures.
VOX1   ?=
VOX2   ?=
CKPT   ?=
TRIALS ?= lists/veri_test2.txt
VOXOUT ?= exp_voxceleb
# Options of m_gen_embs.py (e.g. --mixedprec) and of every m_trainer.py call (e.g. --max_epoch 50)
VOX_EMBED_FLAGS ?=
VOX_TRAIN_FLAGS ?=
VOX_EMB   = $(VOXOUT)/embeddings
VOX_LISTS = $(VOXOUT)/lists
VOX_RUN   = $(VOXOUT)/voxceleb
VOX_EXTRACTOR = --model ResNetSE34V2 $(if $(filter random,$(CKPT)),--random_init,--initial_model $(CKPT))
VOX_TRAINER = $(PY) m_trainer.py --config configs/voxceleb.yaml --save_path $(VOX_RUN) \
  --train_list $(VOX_LISTS)/vox2_normal_list.txt --train_path $(VOX_EMB)/voxceleb2 \
  --valid_list $(VOX_LISTS)/vox1_heldout_normal_list.txt --valid_path $(VOX_EMB)/voxceleb1 \
  --calib_list $(VOX_LISTS)/vox1_heldout_test_list.txt --calib_path $(VOX_EMB)/voxceleb1 \
  --test_list $(firstword $(TRIALS)) --test_path $(VOX_EMB)/voxceleb1 --test_list_libri= \
  --gen_list $(VOX_LISTS)/vox1_normal_list.txt --gen_path $(VOX_EMB)/voxceleb1 $(VOX_TRAIN_FLAGS)
# No held-out speaker left (empty lists): no validation and no calibration
VOX_HELDOUT = $$(test -s $(VOX_LISTS)/vox1_heldout_normal_list.txt || echo --valid_list= --calib_list=)
# The first trial list's results are result/check.json, each other's result/check_<its name>.json
VOX_CHECKS = $(foreach list,$(wordlist 2,$(words $(TRIALS)),$(TRIALS)),$(VOX_RUN)/result/check_$(basename $(notdir $(list))).json)
# A result (or the enhanced tree's manifest.json) older than a checkpoint is made again
VOX_STALE = test -n "$$(find $(VOX_RUN)/model -name '*.model' -newer $$out)"
voxceleb: $(INSTALL)
	@test -n "$(VOX1)" -a -n "$(VOX2)" || { echo "make voxceleb: give VOX1=<VoxCeleb1 wav folder> VOX2=<VoxCeleb2 dev aac folder>" >&2; exit 2; }
	@test -n "$(CKPT)" || { echo "make voxceleb: give CKPT=baseline_v2_ap.model (voxceleb_trainer's released weights; CKPT=random: untrained, for tests)" >&2; exit 2; }
	@for list in $(TRIALS); do test -f $$list || { echo "make voxceleb: trial list $$list not found (lists/README.md)" >&2; exit 2; }; done
	$(PY) m_gen_embs.py $(VOX_EXTRACTOR) --db_path $(VOX2) --embed_dir $(VOX_EMB)/voxceleb2 $(VOX_EMBED_FLAGS)
	$(PY) m_gen_embs.py $(VOX_EXTRACTOR) --db_path $(VOX1) --embed_dir $(VOX_EMB)/voxceleb1 $(VOX_EMBED_FLAGS)
	$(PY) m_comb_embs.py --embed_dir $(VOX_EMB)/voxceleb2
	$(PY) m_comb_embs.py --embed_dir $(VOX_EMB)/voxceleb1
	$(PY) m_gen_list.py --embed_dir $(VOX_EMB)/voxceleb2 --filename vox2 --list_dir $(VOX_LISTS) --lists normal
	$(PY) m_gen_list.py --embed_dir $(VOX_EMB)/voxceleb1 --filename vox1 --list_dir $(VOX_LISTS) --lists normal distribution
	$(PY) m_gen_list.py --embed_dir $(VOX_EMB)/voxceleb1 --filename vox1_heldout --list_dir $(VOX_LISTS) \
	  --lists normal test --exclude_speakers_of $(TRIALS)
	$(VOX_TRAINER) $(VOX_HELDOUT)
	for list in $(TRIALS); do \
	  name=$$(basename $$list); tag=$${name%.*}; out=$(VOX_RUN)/result/check_$$tag.json; flags="--result_tag $$tag"; \
	  if [ $$list = $(firstword $(TRIALS)) ]; then out=$(VOX_RUN)/result/check.json; flags=; fi; \
	  if [ -f $$out ] && [ $$out -nt $$list ] && ! $(VOX_STALE); then echo "$$out: up to date"; continue; fi; \
	  $(VOX_TRAINER) $(VOX_HELDOUT) --check --test_list $$list $$flags || exit 1; \
	done
	out=$(VOX_RUN)/enhanced/manifest.json; \
	if [ -f $$out ] && ! $(VOX_STALE); then echo "$(VOX_RUN)/enhanced: up to date"; \
	else $(VOX_TRAINER) --generate; fi
	$(PY) m_viewer.py --save_path $(VOX_RUN) \
	  --table_results $(VOX_RUN)/result/check.json $(VOX_CHECKS) \
	  --dist_list $(VOX_LISTS)/vox1_distribution_list.txt --embed_dir $(VOX_EMB)/voxceleb1
