package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/host/bench"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// inProcess is a bench.Conn that signs in this process with the enclave's
// own signer package: the rate the gRPC stack is measured against. It
// does what the enclave's Sign handler does (select the key, hash, sign)
// without the RPC.
type inProcess struct {
	s   *signer.Signer
	req *pb.SignRequest
}

func (c inProcess) Call(ctx context.Context) error {
	_, err := c.s.Sign(ctx, c.req)
	return err
}

func (inProcess) Close() error { return nil }

// targets collects --target NAME=ADDRESS.
type targets []bench.Target

func (t *targets) String() string { return fmt.Sprint(len(*t)) + " targets" }

func (t *targets) Set(s string) error {
	name, addr, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return errors.New("want NAME=ADDRESS, e.g. stack=tcp://127.0.0.1:7002")
	}
	if _, err := target.Parse(addr); err != nil {
		return err
	}
	*t = append(*t, bench.Target{Name: name, Addr: addr})
	return nil
}

const baselineUsage = `Usage: nitrosign-benchserver sign-baseline [flags]

Measures the raw in-process signing rate (the enclave's signer package
called directly, with keys of the same type and size generated here) and,
in the same invocation and interleaved rounds, each --target through gRPC
with the same workload and load shape. The in-process figure is the
baseline; each target's ratio to it is what the gRPC stack keeps.

Examples:
  # ECDSA P-256 in process vs through proxy and enclave (three processes)
  nitrosign-benchserver sign-baseline --key-type ecc --target stack=tcp://127.0.0.1:7002 \
      --concurrency 64 --connections 2 --duration 5s --rounds 3

  # RSA-2048, also straight to the enclave harness
  nitrosign-benchserver sign-baseline --key-type rsa --target direct=tcp://127.0.0.1:7001 \
      --target stack=tcp://127.0.0.1:7002 --concurrency 64 --connections 2
`

func runBaseline(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("sign-baseline", baselineUsage, stderr)
	cfg := bench.DefaultConfig()
	w := bench.DefaultWorkload()
	w.RPC = bench.RPCSign
	var tg targets
	var rsaBits int
	var curve, jsonFile, chart string
	fs.StringVar(&w.KeyType, "key-type", w.KeyType, "key to sign with: rsa, ecc or ed25519")
	fs.StringVar(&w.Algorithm, "algorithm", "", "KMS algorithm name (default: the key's default)")
	fs.StringVar(&w.MessageType, "message-type", w.MessageType, "raw or digest")
	fs.IntVar(&w.MessageSize, "message-size", w.MessageSize, "message size in bytes")
	fs.IntVar(&rsaBits, "rsa-bits", 2048, "RSA key size of the in-process key (match the enclave's)")
	fs.StringVar(&curve, "ecc-curve", "P-256", "ECC curve of the in-process key (match the enclave's)")
	fs.Var(&tg, "target", "also measure `NAME=ADDRESS` through gRPC (repeatable)")
	fs.IntVar(&cfg.Connections, "connections", cfg.Connections, "connections per gRPC target")
	fs.IntVar(&cfg.Concurrency, "concurrency", 64, "workers (calls in flight)")
	fs.DurationVar(&cfg.Duration, "duration", 5*time.Second, "measured length of each run")
	fs.DurationVar(&cfg.Warmup, "warmup", time.Second, "unrecorded load before each run")
	rounds := fs.Int("rounds", 3, "rounds per target, interleaved")
	fs.StringVar(&jsonFile, "json", "", "write the comparison as JSON to `FILE`")
	fs.StringVar(&chart, "chart", "", "write an SVG latency chart to `FILE`")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if err := errors.Join(cfg.Validate(), w.Validate()); err != nil {
		return usageErr(stderr, fs.Name(), "%s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	if chart != "" && strings.ToLower(filepath.Ext(chart)) != ".svg" {
		return usageErr(stderr, fs.Name(), "--chart %q: want a .svg file", chart)
	}
	s, err := signer.New(signer.Params{
		Config: signer.Config{RSABits: rsaBits, ECCCurve: curve, Ed25519: true},
		Logger: zap.NewNop(),
	})
	if err != nil {
		return usageErr(stderr, fs.Name(), "%v", err)
	}
	msg, err := w.NewRequest()
	if err != nil {
		return usageErr(stderr, fs.Name(), "%v", err)
	}
	req := msg.(*pb.SignRequest)
	// Fail now, not once per call, if the workload does not fit the key.
	if _, err := s.Sign(ctx, req); err != nil {
		return usageErr(stderr, fs.Name(), "the workload does not fit the in-process key: %v", err)
	}
	all := []bench.Target{{Name: "in-process", Addr: "in-process signer", Dial: func(context.Context) (bench.Conn, error) {
		return inProcess{s: s, req: req}, nil
	}}}
	for _, t := range tg {
		d, err := bench.GRPCDialer(t.Addr, w)
		if err != nil {
			return usageErr(stderr, fs.Name(), "%v", err)
		}
		t.Dial = d
		all = append(all, t)
	}
	var progress io.Writer
	if f, ok := stderr.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			progress = f
		}
	}
	cmp, err := bench.Compare(ctx, cfg, all, bench.CompareOptions{
		Rounds: *rounds, Workload: w.String(), Progress: progress, Pause: 200 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	if err := cmp.WriteText(stdout); err != nil {
		return err
	}
	if jsonFile != "" {
		b, err := json.MarshalIndent(cmp, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(jsonFile, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("write --json file: %w", err)
		}
	}
	if chart != "" {
		var b bytes.Buffer
		if err := bench.WriteChart(&b, "in-process signing vs gRPC", cmp.Results, bench.ChartSVG); err != nil {
			return err
		}
		if err := os.WriteFile(chart, b.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write --chart file: %w", err)
		}
	}
	return nil
}
