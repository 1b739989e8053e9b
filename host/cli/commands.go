package cli

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// ---- echo ----------------------------------------------------------------

const echoUsage = `Usage: nitrosign echo [flags]

Sends a payload, checks it comes back unchanged, prints the round trip.

Examples:
  nitrosign echo --target tcp://127.0.0.1:8443 --payload hello
  nitrosign echo --target vsock://16:5005 --size 1024 --count 10
`

func runEcho(ctx context.Context, c *cmd, args []string) error {
	payload := c.String("payload", "ping", "payload text")
	size := c.Int("size", -1, "send this many bytes of zeros instead of --payload")
	count := c.Int("count", 1, "number of calls")
	if err := c.parse(args); err != nil {
		return err
	}
	if *count < 1 {
		return usagef("--count must be at least 1")
	}
	if *size > 64<<20 {
		return usagef("--size %d: at most 64 MiB", *size)
	}
	data := []byte(*payload)
	if *size >= 0 {
		data = make([]byte, *size)
	}
	ctx, cl, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	type result struct {
		Target      string    `json:"target"`
		Bytes       int       `json:"bytes"`
		ReceiveTime time.Time `json:"server_receive_time"`
		RoundTripUS float64   `json:"round_trip_us"`
	}
	var results []result
	for i := 0; i < *count; i++ {
		start := time.Now()
		resp, err := cl.Echo.Echo(ctx, &pb.EchoRequest{Payload: data})
		rtt := time.Since(start)
		if err != nil {
			return err
		}
		if !bytes.Equal(resp.GetPayload(), data) {
			return fmt.Errorf("payload came back changed (%d bytes sent, %d received)", len(data), len(resp.GetPayload()))
		}
		results = append(results, result{cl.Target().String(), len(data), resp.GetReceiveTime().AsTime(), float64(rtt.Nanoseconds()) / 1e3})
	}
	if c.output == "json" {
		if len(results) == 1 {
			return printJSON(c.Stdout, results[0])
		}
		return printJSON(c.Stdout, results)
	}
	for _, r := range results {
		fmt.Fprintf(c.Stdout, "echo %d bytes from %s: round trip %s (server received at %s)\n",
			r.Bytes, r.Target, time.Duration(r.RoundTripUS*1e3).Round(time.Microsecond), r.ReceiveTime.Format(time.RFC3339Nano))
	}
	return nil
}

// ---- keys ----------------------------------------------------------------

// keyJSON is the JSON form of a KeyInfo.
type keyJSON struct {
	KeyID             string   `json:"key_id"`
	KeyType           string   `json:"key_type"`
	KeySpec           string   `json:"key_spec"`
	DefaultAlgorithm  string   `json:"default_signing_algorithm"`
	SigningAlgorithms []string `json:"signing_algorithms"`
	CreateTime        string   `json:"create_time,omitempty"`
	Version           uint32   `json:"version"`
	State             string   `json:"state"`
	TypeDefault       bool     `json:"type_default"`
	PublicKeyPEM      string   `json:"public_key_pem"`
}

func toKeyJSON(k *pb.KeyInfo) keyJSON {
	algs := make([]string, len(k.GetSigningAlgorithms()))
	for i, a := range k.GetSigningAlgorithms() {
		algs[i] = sigalg.Name(a)
	}
	j := keyJSON{
		KeyID:             k.GetKeyId(),
		KeyType:           sigalg.TypeName(k.GetKeyType()),
		KeySpec:           sigalg.SpecName(k.GetKeySpec()),
		DefaultAlgorithm:  sigalg.Name(k.GetDefaultSigningAlgorithm()),
		SigningAlgorithms: algs,
		Version:           max(k.GetVersion(), 1),
		State:             stateName(k.GetKeyState()),
		TypeDefault:       k.GetTypeDefault(),
		PublicKeyPEM:      publicPEM(k.GetPublicKey()),
	}
	if k.GetCreateTime() != nil {
		j.CreateTime = k.GetCreateTime().AsTime().Format(time.RFC3339)
	}
	return j
}

func publicPEM(spki []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}))
}

const keysUsage = `Usage: nitrosign keys [flags]
       nitrosign keys create|disable|enable ... (nitrosign keys create -h)

Lists the enclave's signing keys: id, type, spec, version, state and
algorithms; the type's default (what --key-type selects) is marked *.
create, disable and enable rotate a sealed keyset.

Examples:
  nitrosign keys
  nitrosign keys --target vsock://16:5005 --output json
  nitrosign keys create --type rsa
`

func runKeys(ctx context.Context, c *cmd, args []string) error {
	if len(args) > 0 && keyAdminVerbs[args[0]] {
		return runKeyAdmin(ctx, c, args[0], args[1:])
	}
	if err := c.parse(args); err != nil {
		return err
	}
	ctx, cl, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	resp, err := cl.Signer.ListKeys(ctx, &pb.ListKeysRequest{})
	if err != nil {
		return err
	}
	if c.output == "json" {
		out := make([]keyJSON, len(resp.GetKeys()))
		for i, k := range resp.GetKeys() {
			out[i] = toKeyJSON(k)
		}
		return printJSON(c.Stdout, out)
	}
	tw := tabwriter.NewWriter(c.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY ID\tTYPE\tSPEC\tVERSION\tSTATE\tDEFAULT ALGORITHM\tALGORITHMS")
	for _, k := range resp.GetKeys() {
		j := toKeyJSON(k)
		mark := ""
		if k.GetTypeDefault() {
			mark = " *"
		}
		fmt.Fprintf(tw, "%s\t%s%s\t%s\t%d\t%s\t%s\t%s\n", j.KeyID, j.KeyType, mark, j.KeySpec, max(k.GetVersion(), 1), stateName(k.GetKeyState()), j.DefaultAlgorithm, strings.Join(j.SigningAlgorithms, ","))
	}
	return tw.Flush()
}

// ---- key selection -------------------------------------------------------

type keyFlags struct {
	keyType string
	keyID   string
}

func (k *keyFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&k.keyType, "key-type", "", "key to use by type: rsa, ecc or ed25519")
	fs.StringVar(&k.keyID, "key-id", "", "key to use by id (hex SHA-256 of its DER public key)")
}

func (k *keyFlags) selector() (*pb.KeySelector, error) {
	switch {
	case k.keyType != "" && k.keyID != "":
		return nil, usagef("give either --key-type or --key-id, not both")
	case k.keyID != "":
		return &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: k.keyID}}, nil
	case k.keyType != "":
		t, err := parseKeyType(k.keyType)
		if err != nil {
			return nil, err
		}
		return &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: t}}, nil
	}
	return nil, usagef("choose a key: --key-type rsa|ecc|ed25519 or --key-id ID")
}

func parseKeyType(s string) (pb.KeyType, error) {
	switch strings.ToLower(s) {
	case "rsa":
		return pb.KeyType_KEY_TYPE_RSA, nil
	case "ecc", "ecdsa", "ec":
		return pb.KeyType_KEY_TYPE_ECC, nil
	case "ed25519":
		return pb.KeyType_KEY_TYPE_ED25519, nil
	}
	return 0, usagef("--key-type %q: want rsa, ecc or ed25519", s)
}

// ---- pubkey --------------------------------------------------------------

const pubkeyUsage = `Usage: nitrosign pubkey (--key-type T | --key-id ID) [flags]

Prints a public key as PEM (SubjectPublicKeyInfo), ready for openssl.

Examples:
  nitrosign pubkey --key-type ecc > ecc.pem
  nitrosign pubkey --key-type rsa --output json
`

func runPubkey(ctx context.Context, c *cmd, args []string) error {
	out := c.String("out", "", "write the PEM to this file instead of stdout")
	if err := c.parse(args); err != nil {
		return err
	}
	sel, err := c.selector()
	if err != nil {
		return err
	}
	ctx, cl, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	resp, err := cl.Signer.GetPublicKey(ctx, &pb.GetPublicKeyRequest{Key: sel})
	if err != nil {
		return err
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(publicPEM(resp.GetKey().GetPublicKey())), 0o644); err != nil {
			return err
		}
	}
	if c.output == "json" {
		return printJSON(c.Stdout, toKeyJSON(resp.GetKey()))
	}
	if *out == "" {
		fmt.Fprint(c.Stdout, publicPEM(resp.GetKey().GetPublicKey()))
	}
	return nil
}

// ---- message input -------------------------------------------------------

type messageFlags struct {
	message string
	in      string
	hexIn   bool
	digest  bool
	alg     string
}

func (m *messageFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&m.message, "message", "", "the message (default: read --in or stdin)")
	fs.StringVar(&m.in, "in", "", `read the message from this file ("-" for stdin)`)
	fs.BoolVar(&m.hexIn, "hex", false, "the message is hex-encoded (handy for digests)")
	fs.BoolVar(&m.digest, "digest", false, "the message is already a digest of the algorithm's hash size (MESSAGE_TYPE_DIGEST); without it the server hashes the message (RAW, at most 4096 bytes). A digest sent without --digest is hashed again.")
	fs.StringVar(&m.alg, "algorithm", "", "signing algorithm by KMS name, e.g. ECDSA_SHA_256, RSASSA_PSS_SHA_256 (default: the key's default)")
}

func (m *messageFlags) read(io IO, fs *flag.FlagSet) ([]byte, pb.MessageType, pb.SigningAlgorithm, error) {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "message" {
			set = true
		}
	})
	msg, err := readInput(io, m.message, set, m.in)
	if err != nil {
		return nil, 0, 0, err
	}
	if m.hexIn {
		msg, err = hex.DecodeString(strings.TrimSpace(string(msg)))
		if err != nil {
			return nil, 0, 0, usagef("--hex: message is not hex: %v", err)
		}
	}
	mt := pb.MessageType_MESSAGE_TYPE_RAW
	if m.digest {
		mt = pb.MessageType_MESSAGE_TYPE_DIGEST
	}
	var alg pb.SigningAlgorithm
	if m.alg != "" {
		if alg, err = sigalg.Parse(m.alg); err != nil {
			return nil, 0, 0, usagef("--algorithm: %v", err)
		}
	}
	return msg, mt, alg, nil
}

// ---- sign ----------------------------------------------------------------

const signUsage = `Usage: nitrosign sign (--key-type T | --key-id ID) [flags]

Signs a message (RAW, hashed by the enclave) or a digest (--digest) and
prints the signature as base64, or writes the raw bytes with --out.

Examples:
  echo -n hello | nitrosign sign --key-type ecc
  nitrosign sign --key-type rsa --algorithm RSASSA_PSS_SHA_256 --in doc.txt --out doc.sig
  nitrosign sign --key-type ecc --digest --hex --message $(sha256sum doc.txt | cut -c1-64)
`

func runSign(ctx context.Context, c *cmd, args []string) error {
	var m messageFlags
	m.register(c.FlagSet)
	var a attestFlags
	attestedOnly := c.Bool("attested", false, "trust only an attested key: fetch and verify an attestation document first (see 'nitrosign attest -h' for its policy flags), sign, and check the signature against the attested key")
	a.register(c.FlagSet)
	out := c.String("out", "", "write the raw signature bytes to this file")
	if err := c.parse(args); err != nil {
		return err
	}
	sel, err := c.selector()
	if err != nil {
		return err
	}
	msg, mt, alg, err := m.read(c.IO, c.FlagSet)
	if err != nil {
		return err
	}
	ctx, cl, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	var attestedKey *pb.KeyInfo
	if *attestedOnly {
		if attestedKey, err = a.attestedKey(ctx, cl, sel); err != nil {
			return err
		}
	}
	resp, err := cl.Signer.Sign(ctx, &pb.SignRequest{Key: sel, Message: msg, MessageType: mt, SigningAlgorithm: alg})
	if err != nil {
		return err
	}
	if attestedKey != nil {
		if err := checkAttested(attestedKey, resp, msg, mt); err != nil {
			return err
		}
	}
	if *out != "" {
		if err := os.WriteFile(*out, resp.GetSignature(), 0o644); err != nil {
			return err
		}
	}
	if c.output == "json" {
		return printJSON(c.Stdout, map[string]string{
			"key_id":            resp.GetKeyId(),
			"signing_algorithm": sigalg.Name(resp.GetSigningAlgorithm()),
			"signature":         base64.StdEncoding.EncodeToString(resp.GetSignature()),
		})
	}
	if *out == "" {
		fmt.Fprintln(c.Stdout, base64.StdEncoding.EncodeToString(resp.GetSignature()))
	} else {
		fmt.Fprintf(c.Stderr, "signed with key %s (%s): %d bytes written to %s\n", resp.GetKeyId(), sigalg.Name(resp.GetSigningAlgorithm()), len(resp.GetSignature()), *out)
	}
	return nil
}

// ---- verify --------------------------------------------------------------

const verifyUsage = `Usage: nitrosign verify (--key-type T | --key-id ID | --public-key FILE) (--signature B64 | --signature-file FILE) [flags]

Verifies a signature locally, with the public key fetched from the server
(--key-type/--key-id) or read from a PEM file (--public-key, no server
needed). Exits 0 only when the signature is valid, 1 when it is not.

Examples:
  echo -n hello | nitrosign verify --key-type ecc --signature MEUCIQ...
  nitrosign verify --public-key rsa.pem --algorithm RSASSA_PSS_SHA_256 --in doc.txt --signature-file doc.sig
`

func runVerify(ctx context.Context, c *cmd, args []string) error {
	var m messageFlags
	m.register(c.FlagSet)
	var a attestFlags
	attestedOnly := c.Bool("attested", false, "use only an attested key: fetch and verify an attestation document and take the key from it (see 'nitrosign attest -h' for its policy flags)")
	a.register(c.FlagSet)
	pubFile := c.String("public-key", "", "PEM public key file (verify offline)")
	sigB64 := c.String("signature", "", "the signature, base64")
	sigFile := c.String("signature-file", "", "file with the raw signature bytes")
	if err := c.parse(args); err != nil {
		return err
	}
	var sig []byte
	switch {
	case *sigB64 != "" && *sigFile != "":
		return usagef("give either --signature or --signature-file, not both")
	case *sigB64 != "":
		var err error
		if sig, err = base64.StdEncoding.DecodeString(strings.TrimSpace(*sigB64)); err != nil {
			return usagef("--signature is not base64: %v", err)
		}
	case *sigFile != "":
		var err error
		if sig, err = os.ReadFile(*sigFile); err != nil {
			return err
		}
	default:
		return usagef("give the signature: --signature B64 or --signature-file FILE")
	}
	msg, mt, alg, err := m.read(c.IO, c.FlagSet)
	if err != nil {
		return err
	}
	var pub crypto.PublicKey
	var keyID string
	var defAlg pb.SigningAlgorithm
	if *pubFile != "" && *attestedOnly {
		return usagef("give either --public-key or --attested, not both")
	}
	if *pubFile != "" {
		if c.keyType != "" || c.keyID != "" {
			return usagef("give either --public-key or --key-type/--key-id, not both")
		}
		pub, err = readPublicPEM(*pubFile)
		if err != nil {
			return err
		}
		spec, err := sigalg.SpecOf(pub)
		if err != nil {
			return err
		}
		defAlg = sigalg.ForKey(spec)[0]
	} else {
		sel, err := c.selector()
		if err != nil {
			return err
		}
		ctx, cl, done, err := c.connect(ctx)
		if err != nil {
			return err
		}
		defer done()
		var key *pb.KeyInfo
		if *attestedOnly {
			if key, err = a.attestedKey(ctx, cl, sel); err != nil {
				return err
			}
		} else {
			resp, err := cl.Signer.GetPublicKey(ctx, &pb.GetPublicKeyRequest{Key: sel})
			if err != nil {
				return err
			}
			key = resp.GetKey()
		}
		if pub, err = x509.ParsePKIXPublicKey(key.GetPublicKey()); err != nil {
			return fmt.Errorf("server sent an unparsable public key: %w", err)
		}
		keyID = key.GetKeyId()
		defAlg = key.GetDefaultSigningAlgorithm()
	}
	if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED {
		alg = defAlg
	}
	verr := sigalg.Verify(pub, alg, mt, msg, sig)
	if verr != nil && !errors.Is(verr, sigalg.ErrBadSignature) {
		return usagef("%v", verr)
	}
	if c.output == "json" {
		if err := printJSON(c.Stdout, map[string]any{"valid": verr == nil, "key_id": keyID, "signing_algorithm": sigalg.Name(alg)}); err != nil {
			return err
		}
	} else if verr == nil {
		fmt.Fprintf(c.Stdout, "signature is valid (%s%s)\n", sigalg.Name(alg), keySuffix(keyID))
	}
	if verr != nil {
		return fmt.Errorf("%w (%s%s)", errInvalid, sigalg.Name(alg), keySuffix(keyID))
	}
	return nil
}

func keySuffix(id string) string {
	if id == "" {
		return ""
	}
	return ", key " + id
}

func readPublicPEM(path string) (crypto.PublicKey, error) {
	der, err := readPEM(path, "PUBLIC KEY")
	if err != nil {
		return nil, err
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return pub, nil
}

// checkAttested makes sure a signature came from the attested key: the
// response names it, and the signature verifies against its public key.
func checkAttested(key *pb.KeyInfo, resp *pb.SignResponse, msg []byte, mt pb.MessageType) error {
	if resp.GetKeyId() != key.GetKeyId() {
		return fmt.Errorf("the signature names key %s, not the attested key %s", resp.GetKeyId(), key.GetKeyId())
	}
	pub, err := x509.ParsePKIXPublicKey(key.GetPublicKey())
	if err != nil {
		return err
	}
	if err := sigalg.Verify(pub, resp.GetSigningAlgorithm(), mt, msg, resp.GetSignature()); err != nil {
		return fmt.Errorf("the signature does not verify against the attested key: %w", err)
	}
	return nil
}

// readPEM returns the DER of the first PEM block in path, which must be of
// type typ.
func readPEM(path, typ string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != typ {
		return nil, fmt.Errorf("%s: no PEM %q block", path, typ)
	}
	return blk.Bytes, nil
}
