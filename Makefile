# regionclip — every target installs what it needs on a fresh machine.
#   make test                 the test suite
#   make demo                 the whole pipeline on the generated EmojiWorld
#   make <stage> CONFIG=configs/x.yaml ARGS="a.b=1 c=2"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
CONFIG ?= configs/demo.yaml
ARGS ?=
# The local torch builds; override for another platform, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EMOJI_FONT ?=
DEBIAN_EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
STAMP := $(VENV)/.installed

.PHONY: install install-detectron2 font test lint demo demo-data data validate concepts rpn pseudolabel pretrain teacher transfer eval detect bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Detectron2 for the plugin (regionclip/transfer/detectron2): upstream at a pinned commit (release
# v0.6 does not import with Pillow >= 10), built against the installed torch, hence no build
# isolation; compiling its C++ ops takes minutes. DETECTRON2_SPEC=path/to/detectron2-*.whl
# installs a prebuilt wheel instead (CI does, from ../shared/wheels).
DETECTRON2_COMMIT := 02b5c4e295e990042a714712c21dc79b731e8833
DETECTRON2_SPEC ?= git+https://github.com/facebookresearch/detectron2@$(DETECTRON2_COMMIT)
install-detectron2: install
	$(PY) -m pip install -q --no-build-isolation '$(DETECTRON2_SPEC)'
	$(PY) -c "import detectron2, os; print('detectron2', detectron2.__version__, 'from', os.path.dirname(detectron2.__file__))"

# Noto Color Emoji for EmojiWorld: EMOJI_FONT=path wins, then the Debian package (installed when root).
font:
	@if [ -n "$(EMOJI_FONT)" ]; then \
	  test -f "$(EMOJI_FONT)" || { echo "EMOJI_FONT=$(EMOJI_FONT) does not exist" >&2; exit 1; }; \
	elif [ ! -f $(DEBIAN_EMOJI_FONT) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null; \
	  else \
	    echo "EmojiWorld needs the Noto Color Emoji font: install the Debian package fonts-noto-color-emoji" >&2; \
	    echo "(sudo apt-get install fonts-noto-color-emoji) or pass EMOJI_FONT=/path/to/NotoColorEmoji.ttf" >&2; \
	    exit 1; \
	  fi; \
	fi

export EMOJI_FONT

test: install font
	$(PY) -m pytest -q

lint: install
	$(BIN)/ruff check .

demo-data: install font
	$(PY) -m data_prep.emojiworld --config $(CONFIG) $(ARGS)

data: install
	$(PY) -m pipelines.data --config $(CONFIG) $(ARGS)

validate: install
	$(PY) -m data_prep.validate $(SHARDS)

concepts: install
	$(PY) -m pipelines.concepts --config $(CONFIG) $(ARGS)

rpn: install
	$(PY) -m pipelines.rpn --config $(CONFIG) $(ARGS)

pseudolabel: install
	$(PY) -m pipelines.pseudolabel --config $(CONFIG) $(ARGS)

# Student pretraining on the pseudo-labels; several GPUs/nodes: accelerate launch pretrain.py ...
pretrain: install
	$(PY) pretrain.py --config $(CONFIG) $(ARGS)

# The demo's image-level teacher (pretrain.py as a plain CLIP trainer, from scratch) into
# <output_dir>/teacher; the recipe is configs/demo-teacher.yaml (<config stem>-teacher.yaml).
TEACHER_CONFIG ?= $(basename $(CONFIG))-teacher.yaml
teacher: install
	$(PY) pretrain.py --config $(TEACHER_CONFIG) $(ARGS)

# Open-vocabulary detector on base boxes -> AP50 base/novel/all; transfer.init/transfer.tag pick
# the teacher (CLIP baseline) or a student checkpoint (RegionCLIP).
transfer: install
	$(PY) -m pipelines.transfer --config $(CONFIG) $(ARGS)

# Zero-shot region top-1/top-5 and RPN-box AP50 (all/base/novel) -> runs/<name>/eval/<tag>.json;
# eval.model.pretrained=<checkpoint> eval.tag=<name> picks the model (default: the teacher).
eval: install
	$(PY) -m pipelines.eval --config $(CONFIG) $(ARGS)

# make detect ARGS="--model M --rpn DIR --prompt 'cat. dog.' IMAGES..."
detect: install
	$(PY) -m pipelines.detect $(ARGS)

# Every stage on the generated EmojiWorld (data, teacher, rpn, concepts, pseudolabel, student, eval,
# transfer x2) -> runs/demo/results.json, RESULTS.md, PNGs; finished stages are skipped on a re-run.
# Several seeds: make demo SEEDS="0 1 2" (runs/demo/seed<N> each + the mean +- std in runs/demo).
SEEDS ?=
demo: install font
	$(PY) -m pipelines.demo --config $(CONFIG) $(if $(strip $(SEEDS)),--seeds $(SEEDS)) $(ARGS)

bench: install font
	$(PY) -m pipelines.bench --out runs/bench $(ARGS)

clean:
	rm -rf runs
