package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nitrosign/nitrosign/host/client"
	"github.com/nitrosign/nitrosign/host/verify"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// attestFlags are the verification policy, shared by attest and by
// sign/verify --attested.
type attestFlags struct {
	pcrs         pcrFlag
	pcrsFile     string
	rootFile     string
	devRoot      bool
	allowDebug   bool
	nonceHex     string
	noNonce      bool
	userData     string
	at           string
	saveDocFile  string
	pinPCRs      string
	policySHA256 string
}

func (a *attestFlags) register(fs *flag.FlagSet) {
	fs.Var(&a.pcrs, "pcr", "expected PCR as INDEX=HEX (repeatable), e.g. --pcr 0=7f3a...")
	fs.StringVar(&a.pcrsFile, "pcrs-file", "", `expected PCRs from a JSON file: {"PCR0":"hex",...} as nitro-cli build-enclave prints, or {"0":"hex",...}`)
	fs.StringVar(&a.pinPCRs, "pin-pcrs", "", "pin only these PCRs of --pcrs-file, e.g. 8 (a signed EIF's signing certificate, which stays the same across upgrades signed with it) or 0,1,2")
	fs.StringVar(&a.rootFile, "root", "", "trust this root certificate (PEM) instead of the embedded AWS Nitro Enclaves Root-G1")
	fs.BoolVar(&a.devRoot, "dev-trust-server-root", false, "DEVELOPMENT ONLY: trust the simulated-NSM root the server sends (proves nothing about a real enclave)")
	fs.BoolVar(&a.allowDebug, "allow-debug", false, "accept all-zero PCRs (a debug-mode enclave, whose memory the host can read)")
	fs.StringVar(&a.nonceHex, "nonce", "", "nonce as hex (default: 32 random bytes)")
	fs.BoolVar(&a.noNonce, "no-nonce", false, "send no nonce: accept the enclave's cached start-up document")
	fs.StringVar(&a.userData, "user-data", "", "user data to bind into the document with the keys")
	fs.StringVar(&a.at, "at", "", "verify certificates at this time (RFC 3339 or Unix milliseconds; default now)")
	fs.StringVar(&a.policySHA256, "policy-sha256", "", "require the enclave to enforce the caller policy with this SHA-256 (hex; sha256sum of the deploy/policy.json baked into the image): the document must commit to it")
}

// pcrFlag collects --pcr INDEX=HEX.
type pcrFlag map[uint][]byte

func (p *pcrFlag) String() string { return fmt.Sprint(len(*p)) + " PCRs" }

func (p *pcrFlag) Set(s string) error {
	idx, val, ok := strings.Cut(s, "=")
	if !ok {
		return errors.New("want INDEX=HEX")
	}
	i, err := strconv.ParseUint(strings.TrimPrefix(strings.ToUpper(idx), "PCR"), 10, 8)
	if err != nil || i > 31 {
		return fmt.Errorf("PCR index %q: want 0-31", idx)
	}
	b, err := hex.DecodeString(strings.TrimSpace(val))
	if err != nil {
		return fmt.Errorf("PCR%d value is not hex: %v", i, err)
	}
	if *p == nil {
		*p = map[uint][]byte{}
	}
	(*p)[uint(i)] = b
	return nil
}

// pinOnly keeps in pcrs only the indices listed in list ("8", "0,1,2"),
// each of which must be there. --pcr values (given) are kept too.
func pinOnly(pcrs map[uint][]byte, list string, given int) error {
	keep := map[uint]bool{}
	for _, f := range strings.Split(list, ",") {
		i, err := strconv.ParseUint(strings.TrimPrefix(strings.ToUpper(strings.TrimSpace(f)), "PCR"), 10, 8)
		if err != nil || i > 31 {
			return fmt.Errorf("%q is not a PCR index (0-31)", f)
		}
		if _, ok := pcrs[uint(i)]; !ok {
			return fmt.Errorf("the PCRs file has no PCR%d (an EIF built without --signing-certificate has no PCR8)", i)
		}
		keep[uint(i)] = true
	}
	if given > 0 {
		return errors.New("give --pin-pcrs or --pcr, not both")
	}
	for i := range pcrs {
		if !keep[i] {
			delete(pcrs, i)
		}
	}
	return nil
}

// options turns the flags into a verify.Options, without keys or nonce.
func (a *attestFlags) options() (verify.Options, error) {
	var o verify.Options
	o.AllowDebug = a.allowDebug
	o.PCRs = map[uint][]byte{}
	for i, v := range a.pcrs {
		o.PCRs[i] = v
	}
	if a.pcrsFile != "" {
		b, err := os.ReadFile(a.pcrsFile)
		if err != nil {
			return o, err
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			return o, usagef("--pcrs-file %s: not JSON: %v", a.pcrsFile, err)
		}
		// nitro-cli build-enclave prints {"Measurements": {"PCR0": ...}}.
		if inner, ok := m["Measurements"].(map[string]any); ok {
			m = inner
		}
		for k, v := range m {
			s, ok := v.(string)
			if !ok {
				continue // e.g. "HashAlgorithm": "Sha384 { ... }" is a string too, skipped below
			}
			var pf pcrFlag
			if err := pf.Set(k + "=" + s); err != nil {
				if strings.HasPrefix(strings.ToUpper(k), "PCR") || isDigits(k) {
					return o, usagef("--pcrs-file %s: %v", a.pcrsFile, err)
				}
				continue
			}
			for i, val := range pf {
				o.PCRs[i] = val
			}
		}
		if a.pinPCRs != "" {
			if err := pinOnly(o.PCRs, a.pinPCRs, len(a.pcrs)); err != nil {
				return o, usagef("--pin-pcrs %s: %v", a.pinPCRs, err)
			}
		}
	} else if a.pinPCRs != "" {
		return o, usagef("--pin-pcrs selects PCRs of --pcrs-file, which is not given")
	}
	if a.rootFile != "" {
		root, err := readCertPEM(a.rootFile)
		if err != nil {
			return o, err
		}
		o.Root = root
	}
	if a.at != "" {
		t, err := parseTime(a.at)
		if err != nil {
			return o, usagef("--at: %v", err)
		}
		o.Time = t
	}
	return o, nil
}

func isDigits(s string) bool {
	_, err := strconv.Atoi(s)
	return err == nil
}

func parseTime(s string) (time.Time, error) {
	if ms, err := strconv.ParseInt(s, 10, 64); err == nil {
		return time.UnixMilli(ms), nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither RFC 3339 nor Unix milliseconds", s)
	}
	return t, nil
}

func readCertPEM(path string) (*x509.Certificate, error) {
	der, err := readPEM(path, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func (a *attestFlags) nonce() ([]byte, error) {
	switch {
	case a.noNonce && a.nonceHex != "":
		return nil, usagef("give either --nonce or --no-nonce, not both")
	case a.noNonce:
		return nil, nil
	case a.nonceHex != "":
		n, err := hex.DecodeString(a.nonceHex)
		if err != nil {
			return nil, usagef("--nonce is not hex: %v", err)
		}
		return n, nil
	}
	n := make([]byte, 32)
	_, err := rand.Read(n)
	return n, err
}

// attested is a verified document with the keys it vouches for.
type attested struct {
	doc       *verify.Document
	keys      []*pb.KeyInfo
	simulated bool
	policy    []byte // the caller policy the document commits to; nil: none
}

// fetchAndVerify asks the server for a document bound to a fresh nonce and
// verifies it, with the keys it commits to, under the flags' policy.
func (a *attestFlags) fetchAndVerify(ctx context.Context, cl *client.Client) (*attested, error) {
	opts, err := a.options()
	if err != nil {
		return nil, err
	}
	nonce, err := a.nonce()
	if err != nil {
		return nil, err
	}
	resp, err := cl.Attestation.Attest(ctx, &pb.AttestRequest{Nonce: nonce, UserData: []byte(a.userData)})
	if err != nil {
		return nil, err
	}
	if resp.GetSimulated() && opts.Root == nil {
		if !a.devRoot {
			return nil, errors.New("the server uses a SIMULATED NSM (a development enclave): its documents do not chain to the AWS Nitro root. Pass --dev-trust-server-root to accept its throwaway root for development, or --root FILE")
		}
		root, err := x509.ParseCertificate(resp.GetSimulatedRootCertificate())
		if err != nil {
			return nil, fmt.Errorf("server sent an unparsable simulated root: %w", err)
		}
		opts.Root = root
	}
	if nonce != nil {
		opts.Nonce = nonce
	}
	opts.Keys = resp.GetKeys()
	opts.UserData = []byte(a.userData)
	opts.RequireKeyCommitment = true
	opts.Policy = resp.GetPolicy()
	if a.policySHA256 != "" {
		want, err := hex.DecodeString(a.policySHA256)
		if err != nil || len(want) != sha256.Size {
			return nil, usagef("--policy-sha256 %q: want 64 hex characters", a.policySHA256)
		}
		got := sha256.Sum256(resp.GetPolicy())
		if len(resp.GetPolicy()) == 0 {
			return nil, errors.New("attestation REJECTED: the enclave enforces no caller policy (a development enclave with --dev-allow-anonymous), and --policy-sha256 requires one")
		}
		if !bytes.Equal(got[:], want) {
			return nil, fmt.Errorf("attestation REJECTED: the enclave enforces the policy with SHA-256 %x, not %s", got, a.policySHA256)
		}
	}
	doc, err := verify.Verify(resp.GetDocument(), opts)
	if err != nil {
		return nil, fmt.Errorf("attestation document REJECTED: %w", err)
	}
	if a.saveDocFile != "" {
		if err := os.WriteFile(a.saveDocFile, resp.GetDocument(), 0o644); err != nil {
			return nil, err
		}
	}
	return &attested{doc: doc, keys: resp.GetKeys(), simulated: resp.GetSimulated(), policy: resp.GetPolicy()}, nil
}

// attestedKey fetches and verifies a document under the flags' policy and
// returns the attested key that sel selects.
func (a *attestFlags) attestedKey(ctx context.Context, cl *client.Client, sel *pb.KeySelector) (*pb.KeyInfo, error) {
	at, err := a.fetchAndVerify(ctx, cl)
	if err != nil {
		return nil, err
	}
	return at.key(sel)
}

// key returns the attested key matching sel, or an error when the server's
// key is not among the attested ones.
func (at *attested) key(sel *pb.KeySelector) (*pb.KeyInfo, error) {
	for _, k := range at.keys {
		switch s := sel.GetSelector().(type) {
		case *pb.KeySelector_KeyId:
			if k.GetKeyId() == s.KeyId {
				return k, nil
			}
		case *pb.KeySelector_KeyType:
			if k.GetKeyType() == s.KeyType {
				return k, nil
			}
		}
	}
	return nil, errors.New("the selected key is not among the attested keys")
}

const attestUsage = `Usage: nitrosign attest [flags]

Fetches an attestation document from the enclave (directly or through the
proxy) bound to a fresh random nonce, verifies it — COSE ES384 signature,
certificate chain to the AWS Nitro Enclaves root, nonce, expected PCRs,
no debug-mode PCRs, and the commitment to the signing keys — and prints
the enclave's identity and the keys it vouches for. With --document it
verifies a saved document instead (no server needed).

Examples:
  nitrosign attest --pcrs-file enclave.pcrs.json
  nitrosign attest --pcr 0=7f3a... --output json
  nitrosign attest --document doc.cbor --at 2022-08-04T19:11:20.975Z
  nitrosign attest --dev-trust-server-root      # a development enclave (simulated NSM)
`

func runAttest(ctx context.Context, c *cmd, args []string) error {
	var a attestFlags
	a.register(c.FlagSet)
	docFile := c.String("document", "", "verify this saved document (raw COSE_Sign1 bytes) instead of fetching one")
	c.StringVar(&a.saveDocFile, "save-document", "", "write the fetched document to this file")
	if err := c.parse(args); err != nil {
		return err
	}
	var at *attested
	if *docFile != "" {
		opts, err := a.options()
		if err != nil {
			return err
		}
		if a.nonceHex != "" {
			if opts.Nonce, err = hex.DecodeString(a.nonceHex); err != nil {
				return usagef("--nonce is not hex: %v", err)
			}
		}
		raw, err := readAllLimitFile(*docFile, verify.MaxDocumentSize)
		if err != nil {
			return err
		}
		doc, err := verify.Verify(raw, opts)
		if err != nil {
			return fmt.Errorf("attestation document REJECTED: %w", err)
		}
		at = &attested{doc: doc}
	} else {
		ctx, cl, done, err := c.connect(ctx)
		if err != nil {
			return err
		}
		defer done()
		if at, err = a.fetchAndVerify(ctx, cl); err != nil {
			return err
		}
	}
	return printAttested(c.IO, c.output, at)
}

func readAllLimitFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := readAllLimit(f, limit)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

func printAttested(io IO, output string, at *attested) error {
	d := at.doc
	idx := make([]int, 0, len(d.PCRs))
	for i := range d.PCRs {
		idx = append(idx, int(i))
	}
	sort.Ints(idx)
	if output == "json" {
		pcrs := map[string]string{}
		for _, i := range idx {
			pcrs[strconv.Itoa(i)] = hex.EncodeToString(d.PCRs[uint(i)])
		}
		keys := make([]keyJSON, len(at.keys))
		for i, k := range at.keys {
			keys[i] = toKeyJSON(k)
		}
		return printJSON(io.Stdout, map[string]any{
			"verified":    true,
			"simulated":   at.simulated,
			"module_id":   d.ModuleID,
			"timestamp":   d.Timestamp.UTC().Format(time.RFC3339Nano),
			"digest":      d.Digest,
			"pcrs":        pcrs,
			"nonce":       hex.EncodeToString(d.Nonce),
			"user_data":   hex.EncodeToString(d.UserData),
			"certificate": d.Certificate.Subject.String(),
			"keys":        keys,
			"policy_sha256": func() string {
				if at.policy == nil {
					return ""
				}
				sum := sha256.Sum256(at.policy)
				return hex.EncodeToString(sum[:])
			}(),
		})
	}
	w := io.Stdout
	if at.simulated {
		fmt.Fprintln(w, "WARNING: SIMULATED NSM: this document proves nothing about a real enclave")
	}
	fmt.Fprintln(w, "attestation document VERIFIED")
	fmt.Fprintf(w, "  module id:   %s\n", d.ModuleID)
	fmt.Fprintf(w, "  timestamp:   %s\n", d.Timestamp.UTC().Format(time.RFC3339Nano))
	fmt.Fprintf(w, "  signed by:   %s\n", d.Certificate.Subject.CommonName)
	fmt.Fprintf(w, "  nonce:       %s\n", hex.EncodeToString(d.Nonce))
	for _, i := range idx {
		v := d.PCRs[uint(i)]
		if allZero(v) && i > 4 {
			continue
		}
		fmt.Fprintf(w, "  PCR%-2d        %s\n", i, hex.EncodeToString(v))
	}
	if at.policy != nil {
		sum := sha256.Sum256(at.policy)
		fmt.Fprintf(w, "  caller policy: sha256 %x (%d bytes), committed to\n", sum, len(at.policy))
	} else if at.doc != nil && len(at.keys) > 0 {
		fmt.Fprintln(w, "  caller policy: NONE (a development enclave: anyone who reaches it may sign)")
	}
	if len(at.keys) > 0 {
		fmt.Fprintln(w, "  attested signing keys:")
		for _, k := range at.keys {
			j := toKeyJSON(k)
			fmt.Fprintf(w, "    %s  %s\n", j.KeyID, j.KeySpec)
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
