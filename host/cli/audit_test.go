package cli

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/internal/auditfmt/auditfmttest"
)

// runAuditCommand runs `nitrosign audit ARGS` as Run does: through Run
// once the command is registered in commands, else the same way by hand.
func runAuditCommand(t *testing.T, args ...string) result {
	t.Helper()
	if slices.ContainsFunc(commands, func(c command) bool { return c.name == "audit" }) {
		return run(t, "", append([]string{"audit"}, args...)...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	io := IO{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut}
	c := command{"audit", "verify an audit log", auditUsage, 0, runAudit}
	err := c.run(ctx, newCmd(io, c), args)
	var ue usageError
	code := ExitOK
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.As(err, &ue):
		fmt.Fprintf(&errOut, "nitrosign audit: %v\n", err)
		code = ExitUsage
	default:
		fmt.Fprintf(&errOut, "nitrosign audit: %s\n", describe(err))
		code = ExitFailure
	}
	return result{code, out.String(), errOut.String()}
}

// auditFixture writes an audit file of one chain (simulated NSM) and the
// development root's PEM (after a key block, as a dev root file has).
func auditFixture(t *testing.T) (dir string, lines [][]byte) {
	t.Helper()
	sim, err := attest.NewSimulated(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	c, err := auditfmttest.New(func(spki []byte) ([]byte, error) { return sim.Attestation(nil, nil, spki) }, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Head()
	for i := range 6 {
		c.Decision("k1", sha256.Sum256([]byte{byte(i)}))
	}
	c.Head()
	dir = t.TempDir()
	lines = c.Lines()
	if err := os.WriteFile(filepath.Join(dir, "audit.jsonl"), bytes.Join(lines, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	root := append(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("not this one")}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: sim.DevRootDER()})...)
	if err := os.WriteFile(filepath.Join(dir, "root.pem"), root, 0o600); err != nil {
		t.Fatal(err)
	}
	pcrs, _ := json.Marshal(map[string]string{"PCR0": fmt.Sprintf("%x", attest.SimulatedPCRs()[0])})
	if err := os.WriteFile(filepath.Join(dir, "pcrs.json"), pcrs, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, lines
}

func TestAuditVerify(t *testing.T) {
	dir, lines := auditFixture(t)
	file, root, pcrs := filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "root.pem"), filepath.Join(dir, "pcrs.json")

	r := runAuditCommand(t, "verify", "--file", file, "--dev-trust-root", root, "--pcrs-file", pcrs)
	if r.code != ExitOK || !strings.Contains(r.stdout, "OK: the file verifies (0 warning(s))") ||
		!strings.Contains(r.stdout, "1 chain(s)") || !strings.Contains(r.stdout, "6 decisions (6 allowed, 0 denied), 2 heads") ||
		!strings.Contains(r.stdout, "attested:  yes") {
		t.Fatalf("clean file: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	r = runAuditCommand(t, "verify", "--file", file, "--dev-trust-root", root, "--output", "json")
	var rep struct {
		File   string `json:"file"`
		OK     bool   `json:"ok"`
		Chains []struct {
			Decisions int  `json:"decisions"`
			Attested  bool `json:"attested"`
		} `json:"chains"`
		Faults []any `json:"faults"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || r.code != ExitOK || !rep.OK || rep.File != file ||
		len(rep.Chains) != 1 || rep.Chains[0].Decisions != 6 || !rep.Chains[0].Attested || rep.Faults == nil {
		t.Fatalf("json: %v, exit %d\n%s", err, r.code, r.stdout)
	}

	// A decision removed: exit 1, the line and the kind.
	tampered := filepath.Join(dir, "tampered.jsonl")
	if err := os.WriteFile(tampered, bytes.Join(slices.Delete(slices.Clone(lines), 3, 4), nil), 0o600); err != nil {
		t.Fatal(err)
	}
	r = runAuditCommand(t, "verify", "--file", tampered, "--dev-trust-root", root)
	if r.code != ExitFailure || !strings.Contains(r.stdout, "line 4: error: removed") || !strings.Contains(r.stdout, "FAILED: 1 error(s)") ||
		!strings.Contains(r.stderr, "does NOT verify: 1 error(s), 0 warning(s)") {
		t.Fatalf("tampered: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// Entries after the last head: a warning, exit 0.
	unsigned := filepath.Join(dir, "unsigned.jsonl")
	if err := os.WriteFile(unsigned, bytes.Join(lines[:len(lines)-1], nil), 0o600); err != nil {
		t.Fatal(err)
	}
	r = runAuditCommand(t, "verify", "--file", unsigned, "--dev-trust-root", root)
	if r.code != ExitOK || !strings.Contains(r.stdout, "warning: unsigned") || !strings.Contains(r.stdout, "OK: the file verifies (1 warning(s))") {
		t.Fatalf("unsigned tail: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// The AWS root by default: a simulated document does not verify.
	r = runAuditCommand(t, "verify", "--file", file)
	if r.code != ExitFailure || !strings.Contains(r.stdout, "line 1: error: attestation") || !strings.Contains(r.stdout, "attested:  NO") {
		t.Fatalf("AWS root: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Other PCRs.
	r = runAuditCommand(t, "verify", "--file", file, "--dev-trust-root", root, "--pcr", "0="+strings.Repeat("11", 48))
	if r.code != ExitFailure || !strings.Contains(r.stdout, "PCR0") {
		t.Fatalf("PCR: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

func TestAuditUsage(t *testing.T) {
	dir, _ := auditFixture(t)
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{nil, ExitUsage, "audit needs a subcommand: verify"},
		{[]string{"check"}, ExitUsage, `audit "check": want verify`},
		{[]string{"verify", "--output", "xml"}, ExitUsage, `--output "xml"`},
		{[]string{"verify", "extra"}, ExitUsage, `unexpected argument "extra"`},
		{[]string{"verify", "--pcr", "x"}, ExitUsage, "want INDEX=HEX"},
		{[]string{"verify", "--dev-trust-root", filepath.Join(dir, "audit.jsonl")}, ExitUsage, "no PEM CERTIFICATE block"},
		{[]string{"verify", "--file", filepath.Join(dir, "none.jsonl")}, ExitFailure, "no such file"},
		{[]string{"verify", "-h"}, ExitOK, "Usage: nitrosign audit verify"},
		{[]string{"-h"}, ExitOK, "forged_head"},
	} {
		r := runAuditCommand(t, tt.args...)
		if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
			t.Errorf("%q: exit %d, stderr %q; want %d and %q", tt.args, r.code, r.stderr, tt.code, tt.want)
		}
	}
}
