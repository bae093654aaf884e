# The wrappers' shared flag parsing, sourced by ft-monoencoder.sh, inference-monoencoder.sh,
# create_bm25_baseline_run.sh and create_colbert_baseline_runs.sh. A letter means the same in every wrapper that
# takes it:
#   -d dataset key or YAML    -k results per query / re-ranking depth    -g GPU ids (0 or 0,1) or cpu
#   -s seed                   -r first-stage run key (bm25, colbert, ...)
#   -f stage (1|2)            -c backbone (or set-encoder[:backbone])     -m objective (CL|KD|BCE)
#   -p stage-1 objective      -l learning rate                            -b batch size
#   -M model folder or hub id -L lenient (skip bad lines, report them)    -n Set-Encoder novelty variant
#   -o output run             -t threads    -i index cache root    -S passages per index shard    -R rebuild index
#   -h usage
# A wrapper defines `usage` and `on_flag LETTER VALUE`, sets MOVED (letter -> what replaced it, for letters
# whose meaning changed), then calls `parse_flags SPEC "$@"`; the arguments after the flags are in REST.

die() {
  echo "error: command line: $*" >&2
  exit 2
}

declare -A MOVED=()

parse_flags() {
  local spec=$1 opt OPTARG OPTIND=1
  shift
  while getopts ":${spec}h" opt; do
    case $opt in
      h) usage; exit 0 ;;
      :) die "-$OPTARG needs a value (see $0 -h)" ;;
      \?) if [[ -n ${MOVED[$OPTARG]+set} ]]; then
            die "-$OPTARG is not an option of $(basename "$0") any more: use ${MOVED[$OPTARG]} (see $0 -h)"
          fi
          die "-$OPTARG is not an option (see $0 -h)" ;;
      *) on_flag "$opt" "${OPTARG-}" ;;
    esac
  done
  REST=("${@:OPTIND}")
}

# -s is the seed everywhere; inference-monoencoder.sh once took the first-stage run there
# VALUE [HINT]: a number is range-checked in Python; a word is an old meaning, said in one line with HINT
check_seed() {
  if [[ $1 =~ ^[A-Za-z] ]]; then
    die "-s $1: -s is the seed (expected an integer)${2:+; $2}"
  fi
  return 0
}

check_positive() {  # NAME VALUE: for numbers checked before Python runs (the rest are range-checked there)
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 $2 is invalid (expected a positive integer)"
}

# -g: CUDA_VISIBLE_DEVICES and LAUNCH (python, or torchrun with one process per GPU when several)
set_gpus() {
  LAUNCH=(python)
  case $1 in
    "") ;;
    cpu) export CUDA_VISIBLE_DEVICES="" ;;
    *) [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "-g $1 is invalid (expected GPU ids like 0 or 0,1, or cpu)"
       export CUDA_VISIBLE_DEVICES=$1
       local n
       n=$(tr ',' '\n' <<<"$1" | grep -c .)
       if (( n > 1 )); then LAUNCH=(torchrun --standalone --nproc_per_node "$n"); fi ;;
  esac
}

# -c: BACKBONE without a set-encoder[:] prefix, SET_ENCODER=1 with one, and BACKBONE_ARGS: its
# configs/backbones YAML (--config) or, for a hub id / folder, model.path; model.name names the run folder
# (set-encoder-<backbone> for the Set-Encoder). $1: the project folder.
# NAME: a config name, never a path (`-m ../backbones/bert` must not pick another folder's file)
is_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ && $1 != *..* ]]
}

split_backbone() {
  local root=$1
  SET_ENCODER="" BACKBONE_ARGS=() BACKBONE_NAME=()
  if [[ $BACKBONE == set-encoder || $BACKBONE == set-encoder:* ]]; then
    SET_ENCODER=1 BACKBONE=${BACKBONE#set-encoder} BACKBONE=${BACKBONE#:}
  fi
  local prefix=${SET_ENCODER:+set-encoder-}
  if is_name "$BACKBONE" && [[ -f $root/configs/backbones/$BACKBONE.yaml ]]; then
    BACKBONE_ARGS=(--config "$root/configs/backbones/$BACKBONE.yaml")
    [[ -n $prefix ]] && BACKBONE_NAME=("model.name=$prefix$BACKBONE")
  elif [[ -n $BACKBONE ]]; then
    BACKBONE_NAME=("model.path=$BACKBONE" "model.name=$prefix$(basename "${BACKBONE%/}")")
  fi
  return 0
}
