# Makefile for nitrosign. Every binary is static (CGO_ENABLED=0) and lands in bin/.
# Tools are installed at pinned versions into .tools/ on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

GO          ?= go
BIN         := $(CURDIR)/bin
TOOLS       := $(CURDIR)/.tools
GOFLAGS_BUILD := -trimpath -buildvcs=false
LDFLAGS     := -s -w -buildid=
export CGO_ENABLED := 0

# Pinned tool versions. `make proto` output depends on the first three.
BUF_VERSION                := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
STATICCHECK_VERSION        := v0.8.2

# Run-target defaults (vsock loopback, see README).
CID       ?= 1
PORT      ?= 5005
LISTEN    ?= 127.0.0.1:8443
UPSTREAM  ?= vsock://$(CID):$(PORT)
TARGET    ?= tcp://$(LISTEN)

BINARIES := nitrosign-enclave nitrosign-proxy nitrosign

.PHONY: build test test-unit fuzz lint buf-lint proto proto-check check-deploy reproducible eif soak faults-long isolation-long e2e demo benchmark \
        run-server run-proxy run-client clean tools

build: ## Build every binary into bin/
	@mkdir -p $(BIN)
	$(GO) build $(GOFLAGS_BUILD) -ldflags='$(LDFLAGS)' -o $(BIN)/ ./enclave/cmd/... ./host/cmd/...

test: lint proto-check check-deploy test-unit fuzz reproducible ## Lint, generated code, deploy files, unit and integration tests with -race, bounded fuzzing, reproducible build

# The client-isolation attacks (reliability/isolation_test.go) time a
# well-behaved client beside each attack: they run alone, after the rest,
# so that other packages' tests do not share the two cores with them; then
# once more without the race detector, whose shadow memory multiplies the
# process's RSS, for the RSS criterion.
test-unit:
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 15m -skip '^TestIsolation' ./...
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 10m -run '^TestIsolation' ./reliability/
	$(GO) test -count=1 -timeout 10m -run '^TestIsolation' ./reliability/  # again without -race: RSS is a criterion

# Each fuzz target runs for FUZZTIME; its seed corpus runs in test-unit too.
FUZZTIME ?= 10s
FUZZ_TARGETS := ./host/verify:FuzzVerify ./internal/target:FuzzParse ./internal/sigalg:FuzzDigest \
                ./enclave/server:FuzzSignRequest ./host/proxy:FuzzConfigAddresses ./enclave/attest:FuzzLeafNotAfter \
                ./host/proxy:FuzzRelayFrames ./enclave/recipient:FuzzDecrypt ./enclave/sealing:FuzzReadHeader \
                ./internal/callauth:FuzzParseMetadata ./internal/callauth:FuzzCanonical ./internal/auditfmt:FuzzParse \
                ./internal/callauth:FuzzParseSessionMetadata ./host/proxy:FuzzHeaderBlocks \
                ./host/proxy:FuzzHeaderBlockRoundTrip

fuzz: ## Run every fuzz target for FUZZTIME (default 10s)
	@GO=$(GO) FUZZTIME=$(FUZZTIME) ./scripts/fuzz.sh $(FUZZ_TARGETS)

lint: $(TOOLS)/staticcheck-$(STATICCHECK_VERSION) ## go vet, gofmt, staticcheck, buf lint, the floor plan (README, Layout)
	@unformatted="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.tools/*'))"; \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	scripts/floorplan.sh
	$(TOOLS)/staticcheck ./...
	$(MAKE) --no-print-directory buf-lint

buf-lint: $(TOOLS)/buf-$(BUF_VERSION)
	$(TOOLS)/buf lint

proto: $(TOOLS)/buf-$(BUF_VERSION) $(TOOLS)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION) $(TOOLS)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION) ## Regenerate proto code
	$(TOOLS)/buf lint
	$(TOOLS)/buf generate

proto-check: proto ## Fail when the committed generated code is stale
	@if ! git diff --quiet -- proto || [ -n "$$(git ls-files --others --exclude-standard proto)" ]; then \
	  echo "proto: generated code is stale; run 'make proto' and commit:"; \
	  git status --short -- proto; exit 1; fi

check-deploy: ## shellcheck every script, systemd-analyze verify the units, scripts fail cleanly without nitro-cli
	./scripts/check-deploy.sh

reproducible: ## Build the enclave binary twice (amd64 and arm64) from two trees in different paths; each SHA-256 pair must match
	./scripts/reproducible-build.sh

eif: ## Enclave image, EIF and PCR JSON (needs a Docker engine and nitro-cli; see docs/DEPLOY.md)
	./scripts/build-eif.sh

soak: ## One million mixed Echo and Sign calls through the proxy graph to the enclave graph; figures in docs/RELIABILITY.md
	NITROSIGN_SOAK_CALLS=$${NITROSIGN_SOAK_CALLS:-1000000} $(GO) test -count=1 -run '^TestSoak$$' -timeout 3h -v ./reliability/

faults-long: ## Longer fault injection: 50 kill/restart cycles in process, then 20 over real vsock
	NITROSIGN_FAULT_CYCLES=50 $(GO) test -count=1 -run 'TestEnclaveKilledUnderLoad|TestProxyRestartUnderLoad' -v ./reliability/
	NITROSIGN_E2E_LONG=1 ./scripts/e2e.sh -test.run 'TestEnclaveKilledRepeatedly|TestProxyKilledUnderLoad'

isolation-long: ## Longer client-isolation attacks: more connections, longer floods, 1000 health watches, 5000 concurrent 64 KiB Echo calls a side
	NITROSIGN_ISOLATION_LONG=1 $(GO) test -count=1 -run '^TestIsolation' -timeout 30m -v ./reliability/

e2e: ## Real AF_VSOCK end to end (natively, or in a qemu micro-VM when the kernel lacks vsock_loopback)
	./scripts/e2e.sh

demo: ## Bring up enclave signer and proxy on real vsock, exercise them as a user would, tear down
	./scripts/demo.sh

benchmark: build ## A short side-by-side benchmark, see docs/PERFORMANCE.md
	./scripts/benchmark.sh

run-server: build ## Run the enclave signer on vsock loopback (needs vsock_loopback)
	./scripts/require-vsock-loopback.sh run-server
	$(BIN)/nitrosign-enclave --cid $(CID) --port $(PORT) --log-level debug --log-format console --dev-simulated-nsm --dev-allow-anonymous --audit-ship ""

run-proxy: build ## Run the host proxy in front of run-server
	./scripts/require-vsock-loopback.sh run-proxy
	$(BIN)/nitrosign-proxy --listen $(LISTEN) --upstream $(UPSTREAM) --log-format console

run-client: build ## Exercise the client against run-proxy
	./scripts/require-vsock-loopback.sh run-client
	$(BIN)/nitrosign keys --target $(TARGET)
	echo -n "hello" | $(BIN)/nitrosign sign --target $(TARGET) --key-type ecc --out /tmp/nitrosign-hello.sig
	echo -n "hello" | $(BIN)/nitrosign verify --target $(TARGET) --key-type ecc --signature-file /tmp/nitrosign-hello.sig
	$(BIN)/nitrosign attest --target $(TARGET) --dev-trust-server-root

clean: ## Remove build output and tools
	rm -rf $(BIN) $(TOOLS)

tools: $(TOOLS)/buf-$(BUF_VERSION) $(TOOLS)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION) $(TOOLS)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION) $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)

# Each tool is installed once per pinned version; the stamp file records it.
$(TOOLS)/buf-%:
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) CGO_ENABLED=0 $(GO) install github.com/bufbuild/buf/cmd/buf@$*
	@touch $@
$(TOOLS)/protoc-gen-go-grpc-%:
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$*
	@touch $@
$(TOOLS)/protoc-gen-go-%:
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$*
	@touch $@
$(TOOLS)/staticcheck-%:
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$*
	@touch $@
