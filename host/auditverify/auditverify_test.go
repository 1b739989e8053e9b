package auditverify_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/host/auditverify"
	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/auditfmt"
	"github.com/nitrosign/nitrosign/internal/auditfmt/auditfmttest"
)

var simulated = sync.OnceValues(func() (*attest.Simulated, error) { return attest.NewSimulated(zap.NewNop()) })

func sim(t *testing.T) *attest.Simulated {
	t.Helper()
	s, err := simulated()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func options(t *testing.T) auditverify.Options {
	t.Helper()
	root, err := x509.ParseCertificate(sim(t).DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	return auditverify.Options{Attestation: verify.Options{Root: root, PCRs: attest.SimulatedPCRs()}}
}

// chain builds a chain of n decisions with a head after every 4 and at
// the end, attested by the simulated NSM.
func chain(t *testing.T, prev *auditfmt.Head, n int) *auditfmttest.Chain {
	t.Helper()
	s := sim(t)
	c, err := auditfmttest.New(func(spki []byte) ([]byte, error) { return s.Attestation(nil, nil, spki) }, prev)
	if err != nil {
		t.Fatal(err)
	}
	c.Head()
	for i := range n {
		c.Decision(fmt.Sprint("k", i), sha256.Sum256([]byte{byte(i)}))
		if i%4 == 3 {
			c.Head()
		}
	}
	if c.Entries[len(c.Entries)-1].Kind != auditfmt.KindHead {
		c.Head()
	}
	return c
}

// file is the lines of a file, editable.
type file [][]byte

func (f file) bytes() []byte { return bytes.Join(f, nil) }

func run(t *testing.T, f file, opts auditverify.Options) *auditverify.Report {
	t.Helper()
	rep, err := auditverify.Verify(bytes.NewReader(f.bytes()), opts)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// faults renders the report's faults as "LINE:KIND" (warnings marked w).
func faults(rep *auditverify.Report) []string {
	var out []string
	for _, f := range rep.Faults {
		s := fmt.Sprintf("%d:%s", f.Line, f.Kind)
		if f.Severity == auditverify.Warning {
			s += "(w)"
		}
		out = append(out, s)
	}
	return out
}

// twoChains is a clean file: a chain, then a restart naming its last
// head.
func twoChains(t *testing.T) (file, *auditfmttest.Chain, *auditfmttest.Chain) {
	c1 := chain(t, nil, 10)
	c2 := chain(t, c1.LastHead(), 5)
	return append(file(c1.Lines()), c2.Lines()...), c1, c2
}

func TestCleanFileWithTwoChains(t *testing.T) {
	f, c1, c2 := twoChains(t)
	rep := run(t, f, options(t))
	if !rep.OK || rep.Errors != 0 || rep.Warnings != 0 || len(rep.Faults) != 0 {
		t.Fatalf("clean file: %v", faults(rep))
	}
	if len(rep.Chains) != 2 || rep.Lines != len(f) {
		t.Fatalf("%d chains, %d lines", len(rep.Chains), rep.Lines)
	}
	a, b := rep.Chains[0], rep.Chains[1]
	if a.ID != c1.ID || !a.Attested || a.Decisions != 10 || a.Entries != len(c1.Entries) || a.PreviousHead != nil || *a.LastHead != *c1.LastHead() ||
		a.FirstLine != 1 || a.LastLine != len(c1.Entries) || a.ModuleID == "" {
		t.Fatalf("chain 1: %+v", a)
	}
	if b.ID != c2.ID || !b.Attested || *b.PreviousHead != *c1.LastHead() || b.FirstLine != len(c1.Entries)+1 {
		t.Fatalf("chain 2: %+v", b)
	}
	// The report is JSON for --output json.
	if _, err := json.Marshal(rep); err != nil {
		t.Fatal(err)
	}
}

// Each kind of tampering is reported at its line, with its kind.
func TestTampering(t *testing.T) {
	other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
	for _, tt := range []struct {
		name  string
		edit  func(t *testing.T, f file, c1, c2 *auditfmttest.Chain) file
		want  []string
		clean bool   // verifies despite warnings
		msg   string // in the first fault's message
	}{
		{"a removed entry", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return slices.Delete(f, 3, 4) // seq 3, a decision
		}, []string{"4:removed"}, false, "seq 4 follows seq 2 (line 3): seq 3 is missing here (removed)"},
		{"two entries swapped", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			f[3], f[4] = f[4], f[3] // seq 3 and 4
			return f
		}, []string{"4:reordered", "5:reordered"}, false, "seq 3 is missing here; seq 3 comes later, at line 5: reordered"},
		{"an entry moved later", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			moved := f[2]
			f = slices.Delete(f, 2, 3)
			return slices.Insert(f, 6, moved)
		}, []string{"3:reordered", "7:reordered"}, false, ""},
		{"an edited decision", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			f[2] = bytes.Replace(f[2], []byte(`"outcome":"allowed","code":"OK"`), []byte(`"outcome":"denied","code":"PermissionDenied"`), 1)
			return f
		}, []string{"3:edited"}, false, ""},
		{"an edit with its hash recomputed", func(_ *testing.T, f file, c1, _ *auditfmttest.Chain) file {
			e := *c1.Entries[2]
			e.KeyID = "attacker"
			e.Hash, _ = e.ComputeHash(nil)
			f[2] = append(e.AppendJSON(nil), '\n')
			return f
		}, []string{"4:removed"}, false, "prev is not the hash of seq 2 (line 3)"},
		{"a forged head", func(_ *testing.T, f file, c1, _ *auditfmttest.Chain) file {
			// The attacker rewrites the chain from seq 2 on, every hash
			// right, and signs its heads with a key of its own.
			c := &auditfmttest.Chain{ID: c1.ID, Key: other, Entries: append([]*auditfmt.Entry(nil), c1.Entries[:2]...), Time: c1.Time}
			c.Decision("attacker", sha256.Sum256(nil))
			c.HeadBy(other)
			lines := c.Lines()
			return append(append(file{}, f[:2]...), append(file(lines[2:]), f[len(c1.Entries):]...)...)
		}, []string{"4:forged_head", "5:gap"}, false, ""}, // chain 2 names the head replaced
		{"a head's signature replaced", func(_ *testing.T, f file, c1, _ *auditfmttest.Chain) file {
			h := *c1.Entries[6] // the head after 4 decisions
			h.Signature = ed25519.Sign(other, auditfmt.HeadMessage(h.Chain, h.SignedSeq, h.SignedHash))
			h.Hash, _ = h.ComputeHash(nil)
			f[6] = append(h.AppendJSON(nil), '\n')
			return f
		}, []string{"7:forged_head", "8:removed"}, false, ""},
		{"a duplicated line", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return slices.Insert(f, 3, f[2])
		}, []string{"4:duplicate"}, false, ""},
		{"a reformatted line", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			f[2] = bytes.Replace(f[2], []byte(`","`), []byte(`", "`), 1)
			return f
		}, []string{"3:not_canonical"}, false, ""},
		{"garbage", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return slices.Insert(f, 3, []byte("hello\n"), []byte("\n"))
		}, []string{"4:syntax", "5:syntax"}, false, ""},
		{"a line too long", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return slices.Insert(f, 3, append(bytes.Repeat([]byte("x"), auditverify.MaxLine+1), '\n'))
		}, []string{"4:syntax"}, false, ""},
		{"the start of the file removed", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return f[3:]
		}, []string{"1:no_genesis"}, false, ""},
		{"the end cut, unsigned entries left", func(_ *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return f[:len(f)-1]
		}, []string{"23:unsigned(w)"}, true, "1 entry after the chain's last head (seq 7 to 7, lines 23 to 23): not signed yet"},
		{"a whole chain removed", func(t *testing.T, f file, _, c2 *auditfmttest.Chain) file {
			c3 := chain(t, c2.LastHead(), 2)
			return append(f[:15], c3.Lines()...) // chain 1, then chain 3 naming chain 2
		}, []string{"16:gap"}, false, ""},
		{"chains in the wrong order", func(_ *testing.T, f file, c1, _ *auditfmttest.Chain) file {
			n := len(c1.Entries)
			return append(append(file{}, f[n:]...), f[:n]...)
		}, []string{"1:reordered", "10:unlinked(w)"}, false, ""},
		{"a chain that names nothing after another", func(t *testing.T, f file, _, _ *auditfmttest.Chain) file {
			return append(f, chain(t, nil, 1).Lines()...)
		}, []string{"25:unlinked(w)"}, true, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, c1, c2 := twoChains(t)
			if len(c1.Entries) != 15 || len(c2.Entries) != 9 {
				t.Fatalf("fixture changed: %d and %d entries", len(c1.Entries), len(c2.Entries))
			}
			f = tt.edit(t, slices.Clone(f), c1, c2)
			rep := run(t, f, options(t))
			if got := faults(rep); !slices.Equal(got, tt.want) {
				for _, x := range rep.Faults {
					t.Log(x)
				}
				t.Fatalf("faults %v, want %v", got, tt.want)
			}
			if rep.OK != tt.clean {
				t.Fatalf("OK = %v", rep.OK)
			}
			if tt.msg != "" && !strings.Contains(rep.Faults[0].Message, tt.msg) {
				t.Fatalf("message %q, want %q in it", rep.Faults[0].Message, tt.msg)
			}
		})
	}
}

// The genesis' document must verify under the options and attest the
// audit key.
func TestAttestation(t *testing.T) {
	f, _, _ := twoChains(t)
	t.Run("the AWS root", func(t *testing.T) {
		rep := run(t, f, auditverify.Options{})
		if got := faults(rep); !slices.Equal(got, []string{"1:attestation", "16:attestation"}) || rep.Chains[0].Attested ||
			!strings.Contains(rep.Faults[0].Message, "certificate chain") {
			t.Fatalf("%v: %s", got, rep.Faults[0].Message)
		}
	})
	t.Run("other PCRs", func(t *testing.T) {
		o := options(t)
		o.Attestation.PCRs = map[uint][]byte{0: make([]byte, 48)}
		rep := run(t, f, o)
		if got := faults(rep); !slices.Equal(got, []string{"1:attestation", "16:attestation"}) || !strings.Contains(rep.Faults[0].Message, "PCR0") {
			t.Fatalf("%v", rep.Faults)
		}
	})
	t.Run("a document of another key", func(t *testing.T) {
		s := sim(t)
		pub, _, _ := ed25519.GenerateKey(rand.Reader)
		spki, _ := x509.MarshalPKIXPublicKey(pub)
		c, err := auditfmttest.New(func([]byte) ([]byte, error) { return s.Attestation(nil, nil, spki) }, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.Head()
		rep := run(t, c.Lines(), options(t))
		if got := faults(rep); !slices.Equal(got, []string{"1:key_mismatch"}) {
			t.Fatalf("%v", got)
		}
	})
	t.Run("not a document", func(t *testing.T) {
		c, err := auditfmttest.New(func([]byte) ([]byte, error) { return []byte("not a document"), nil }, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.Head()
		rep := run(t, c.Lines(), options(t))
		if got := faults(rep); !slices.Equal(got, []string{"1:attestation"}) {
			t.Fatalf("%v", got)
		}
	})
}

// The file the enclave's Log writes and the receiver stores is checked in
// host/auditlog's tests; here, a file read from disk, and one that does
// not end in a newline.
func TestVerifyFile(t *testing.T) {
	f, _, _ := twoChains(t)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	b := f.bytes()
	if err := os.WriteFile(path, b[:len(b)-1], 0o600); err != nil {
		t.Fatal(err)
	}
	rep, err := auditverify.VerifyFile(path, options(t))
	if err != nil || !rep.OK || rep.Lines != len(f) {
		t.Fatalf("%v %+v", err, rep)
	}
	if _, err := auditverify.VerifyFile(filepath.Join(t.TempDir(), "none"), options(t)); !os.IsNotExist(err) {
		t.Fatalf("missing file: %v", err)
	}
}

// Faults beyond MaxFaults are counted, not listed.
func TestFaultsBounded(t *testing.T) {
	var f file
	for range auditverify.MaxFaults + 5 {
		f = append(f, []byte("x\n"))
	}
	rep := run(t, f, options(t))
	if len(rep.Faults) != auditverify.MaxFaults || rep.FaultsOmitted != 5 || rep.Errors != auditverify.MaxFaults+5 {
		t.Fatalf("%d faults, %d omitted, %d errors", len(rep.Faults), rep.FaultsOmitted, rep.Errors)
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
