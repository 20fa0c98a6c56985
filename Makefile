# lemonade-grpc developer targets. `make setup` once, then `make run` / `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
GEN := lemonade_grpc/_gen
# Every language's generated code: Python (grpcio-tools), Go and TypeScript (buf).
GENERATED := $(GEN) clients/go/gen clients/typescript/src/gen
PROTOS := $(wildcard protos/lemonade/v1/*.proto)
CACHE := $(HOME)/.cache/lemonade-grpc
# grpcurl as ops use it: tests/test_grpcurl.py runs the README's recipes with it.
GRPCURL_VERSION := v1.9.4
GRPCURL := $(CACHE)/grpcurl-$(GRPCURL_VERSION)/grpcurl
# The code generators buf runs (buf.gen.yaml), pinned, cached outside the checkout.
BUF_VERSION := 1.75.0
PROTOC_GEN_ES_VERSION := 2.17.0
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
NODE_TOOLS := $(CACHE)/node-tools-buf$(BUF_VERSION)-es$(PROTOC_GEN_ES_VERSION)
BUF := $(NODE_TOOLS)/node_modules/.bin/buf
GO_TOOLS := $(CACHE)/go-tools-go$(PROTOC_GEN_GO_VERSION)-grpc$(PROTOC_GEN_GO_GRPC_VERSION)
TOOLS_PATH := $(GO_TOOLS):$(NODE_TOOLS)/node_modules/.bin:$(PATH)
TS := clients/typescript

.PHONY: setup run test generate check-generated lint bench bench-peers bench-control bench-telemetry clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The venv is stamped by pyproject.toml: editing dependencies reinstalls.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## setup: venv with the package (editable), llama-server (cached build), the tiny model, grpcurl (cached), the TypeScript client's packages
setup: $(VENV)/.installed $(GRPCURL) $(TS)/node_modules/.package-lock.json
	$(BIN)/lemonade-grpc setup

# The TypeScript client's dependencies, exactly as its lockfile says.
$(TS)/node_modules/.package-lock.json: $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund

# Built once per machine from the Go module proxy, outside the checkout.
$(GRPCURL):
	GOBIN=$(dir $(GRPCURL)) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(BUF):
	npm install --prefix $(NODE_TOOLS) --no-audit --no-fund --no-save \
		@bufbuild/buf@$(BUF_VERSION) @bufbuild/protoc-gen-es@$(PROTOC_GEN_ES_VERSION)

$(GO_TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(GO_TOOLS) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(GO_TOOLS) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

## run: serve the bundled tiny model on 127.0.0.1:50051
run: setup
	$(BIN)/lemonade-grpc serve

## test: the whole suite against a real server and a real llama-server: Python, then the Go and TypeScript clients
test: setup
	LEMONADE_GRPCURL=$(GRPCURL) $(BIN)/pytest
	cd clients/go && go test ./...
	cd $(TS) && npm test

## generate: regenerate every language's stubs from protos/ (committed; CI checks they are current)
generate: $(VENV)/.installed $(BUF) $(GO_TOOLS)/protoc-gen-go-grpc
	rm -rf $(GEN)/lemonade
	mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=$(GEN) --mypy_out=$(GEN) \
		--grpc_python_out=$(GEN) --mypy_grpc_out=$(GEN) \
		$(PROTOS)
	# protoc writes absolute imports (`from lemonade.v1 import x_pb2`); the stubs
	# live inside lemonade_grpc._gen, so make them package-relative.
	sed -i -E 's/^from lemonade\.v1 import /from . import /; s/^import lemonade\.v1\.([a-z_]+_pb2)$$/from . import \1/' $(GEN)/lemonade/v1/*.py $(GEN)/lemonade/v1/*.pyi
	touch $(GEN)/lemonade/__init__.py $(GEN)/lemonade/v1/__init__.py
	rm -rf clients/go/gen clients/typescript/src/gen
	PATH=$(TOOLS_PATH) $(BUF) generate

## check-generated: fail when the committed stubs differ from what `make generate` writes
check-generated: generate
	git diff --exit-code -- $(GENERATED) || (echo "generated stubs are stale: run 'make generate' and commit" >&2; exit 1)
	test -z "$$(git status --porcelain -- $(GENERATED))" || (echo "untracked generated files: run 'make generate' and commit" >&2; git status --porcelain -- $(GENERATED); exit 1)

## lint: ruff, mypy --strict, the import contracts (lint-imports), buf lint and buf breaking (against the previous commit's protos), go vet and gofmt
lint: $(VENV)/.installed $(BUF) $(TS)/node_modules/.package-lock.json
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BUF) lint
	if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		$(BUF) breaking --against '.git#ref=HEAD~1,subdir=protos'; \
	else echo "buf breaking: no previous commit in this clone (shallow?): skipped"; fi
	cd clients/go && go vet ./... && test -z "$$(gofmt -l lemonade cmd)"
	cd $(TS) && npx tsc -p . --noEmit

bench: setup
	$(BIN)/python bench/proxy.py

## bench-control: no-op Load and Status latency, Watch fan-out to 1,000 subscribers, 100 coalesced Loads (BASELINE=DIR adds another checkout's)
.PHONY: bench-control
# llama-swap, the peer of `make bench-peers`: its module is not on the Go module
# proxy, so it is built from a source snapshot of github.com/mostlygeek/llama-swap
# at this commit (LLAMA_SWAP_SRC=DIR: a checkout or `git archive` of it),
# once, outside the checkout.
LLAMA_SWAP_COMMIT := 0bdb3720199f
LLAMA_SWAP := $(CACHE)/llama-swap-$(LLAMA_SWAP_COMMIT)/llama-swap

$(LLAMA_SWAP):
	@test -n "$(LLAMA_SWAP_SRC)" || { echo "llama-swap is not built: run 'make bench-peers LLAMA_SWAP_SRC=DIR' with DIR a source tree of mostlygeek/llama-swap at $(LLAMA_SWAP_COMMIT)" >&2; exit 1; }
	cd $(LLAMA_SWAP_SRC) && go build -o $@ .

## bench-peers: lemonade-grpc, llama-swap and llama-server side by side, every row of issue 13 (LLAMA_SWAP_SRC=DIR the first time)
bench-peers: setup $(LLAMA_SWAP)
	$(BIN)/python bench/peers.py --llama-swap $(LLAMA_SWAP)

bench-control: setup
	$(BIN)/python bench/control.py $(if $(BASELINE),--baseline $(BASELINE))

## soak: 50 random clients and a backend killer against a real server, invariants checked (not in `make test`; at most 10 minutes; SEED=N, DURATION=S)
.PHONY: soak
soak: setup
	$(BIN)/python bench/soak $(if $(SEED),--seed $(SEED)) $(if $(DURATION),--duration $(DURATION))

## bench-telemetry: the same stream through servers with telemetry off and on (BASELINE=DIR adds another checkout's)
bench-telemetry: setup
	$(BIN)/python bench/telemetry.py $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
