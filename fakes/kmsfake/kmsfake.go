// Package kmsfake is an AWS KMS of our own for tests and the demo: it
// speaks KMS's wire protocol (AWS JSON 1.1 over HTTPS, SigV4-signed,
// TrentService.GenerateDataKey and TrentService.Decrypt with a Recipient),
// so what the tests drive is the production path, the official client
// (github.com/aws/aws-sdk-go-v2/service/kms), pointed here by its
// endpoint or its transport only. It is never linked into a shipped
// binary (scripts/floorplan.sh checks).
//
// A Recipient's attestation document is verified (host/verify, against
// the simulated NSM's root) and must carry the PCRs the key policy names,
// as a policy's kms:RecipientAttestation:PCRn conditions demand; the data
// key then goes back only as CiphertextForRecipient, a CMS EnvelopedData
// built here with encoding/asn1 (the enclave opens it with its own parser,
// enclave/recipient, and a test cross-checks both with openssl cms).
package kmsfake

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/nitrosign/nitrosign/host/verify"
)

// The fake's one KMS key, its region and the only credentials it takes.
const (
	KeyARN          = "arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b"
	Region          = "eu-west-1"
	AccessKeyID     = "AKIAEXAMPLEENCLAVE"
	SecretAccessKey = "enclave-role-secret-for-tests"
	SessionToken    = "session-token-for-tests"
)

// Host is the name the fake's TLS certificate is for: the real regional
// endpoint, so a client needs no endpoint change when its transport dials
// the fake (as the enclave's does, through the parent's forwarder).
const Host = "kms." + Region + ".amazonaws.com"

// Credentials are the ones the fake checks SigV4 signatures with.
func Credentials() aws.Credentials {
	return aws.Credentials{AccessKeyID: AccessKeyID, SecretAccessKey: SecretAccessKey, SessionToken: SessionToken}
}

// KMS is the fake. It is an http.Handler; Start serves it over TLS.
type KMS struct {
	keyARN string
	region string
	creds  aws.Credentials
	root   *x509.Certificate
	master []byte // AES-256-GCM key behind the CiphertextBlobs

	mu        sync.Mutex
	pcrs      map[uint][]byte // the key policy's PCR conditions
	calls     []string
	misbehave string // "plaintext": also return Plaintext; "other-recipient": encrypt to another key
	issued    [][]byte
	down      bool // answer every call 503 KMSInternalException
	delay     time.Duration
}

// New returns a fake whose key policy admits documents that chain to root
// and carry pcrs.
func New(root *x509.Certificate, pcrs map[uint][]byte) *KMS {
	master := make([]byte, 32)
	if _, err := rand.Read(master); err != nil {
		panic(err) // crypto/rand does not fail
	}
	return &KMS{
		keyARN: KeyARN,
		region: Region,
		creds:  Credentials(),
		root:   root, pcrs: pcrs, master: master,
	}
}

// SetPCRs replaces the key policy's PCR conditions.
func (k *KMS) SetPCRs(pcrs map[uint][]byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pcrs = pcrs
}

// SetMisbehave makes the fake break the protocol: "plaintext" returns the
// data key in clear too; "other-recipient" encrypts it to another key; ""
// behaves.
func (k *KMS) SetMisbehave(how string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.misbehave = how
}

// SetDown makes every call fail with 503 KMSInternalException (a KMS
// outage), or not.
func (k *KMS) SetDown(down bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.down = down
}

// SetDelay makes every call wait d before it is answered (a slow KMS).
func (k *KMS) SetDelay(d time.Duration) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.delay = d
}

type kmsFault struct {
	status int
	typ    string
	msg    string
}

func (k *KMS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		k.fail(w, kmsFault{400, "SerializationException", err.Error()})
		return
	}
	if e := k.checkRequest(r, body); e != nil {
		k.fail(w, *e)
		return
	}
	op := strings.TrimPrefix(r.Header.Get("X-Amz-Target"), "TrentService.")
	k.mu.Lock()
	k.calls = append(k.calls, op)
	down, delay := k.down, k.delay
	k.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if down {
		k.fail(w, kmsFault{503, "KMSInternalException", "the fake KMS is down"})
		return
	}
	var out any
	var e *kmsFault
	switch op {
	case "GenerateDataKey":
		out, e = k.generateDataKey(body)
	case "Decrypt":
		out, e = k.decrypt(body)
	default:
		e = &kmsFault{400, "UnknownOperationException", op}
	}
	if e != nil {
		k.fail(w, *e)
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	_ = json.NewEncoder(w).Encode(out)
}

func (k *KMS) fail(w http.ResponseWriter, e kmsFault) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.WriteHeader(e.status)
	_ = json.NewEncoder(w).Encode(map[string]string{"__type": e.typ, "message": e.msg})
}

// checkRequest checks the protocol and recomputes the SigV4 signature with
// the credentials the client must have used.
func (k *KMS) checkRequest(r *http.Request, body []byte) *kmsFault {
	if r.Method != http.MethodPost || r.URL.Path != "/" || r.Header.Get("Content-Type") != "application/x-amz-json-1.1" ||
		!strings.HasPrefix(r.Header.Get("X-Amz-Target"), "TrentService.") {
		return &kmsFault{400, "SerializationException", "not an AWS JSON 1.1 KMS request"}
	}
	auth := r.Header.Get("Authorization")
	const scheme = "AWS4-HMAC-SHA256 "
	if !strings.HasPrefix(auth, scheme) {
		return &kmsFault{400, "MissingAuthenticationTokenException", "no SigV4 Authorization header"}
	}
	fields := map[string]string{}
	for _, f := range strings.Split(strings.TrimPrefix(auth, scheme), ", ") {
		kv := strings.SplitN(f, "=", 2)
		if len(kv) == 2 {
			fields[kv[0]] = kv[1]
		}
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[0] != k.creds.AccessKeyID || scope[2] != k.region || scope[3] != "kms" {
		return &kmsFault{400, "UnrecognizedClientException", "credential scope " + fields["Credential"]}
	}
	when, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		return &kmsFault{400, "IncompleteSignatureException", "X-Amz-Date"}
	}
	sum := sha256.Sum256(body)
	if r.Header.Get("X-Amz-Content-Sha256") != "" && r.Header.Get("X-Amz-Content-Sha256") != hex.EncodeToString(sum[:]) {
		return &kmsFault{400, "InvalidSignatureException", "payload hash"}
	}
	// The same request, with only the headers it signed, signed again.
	re, _ := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), bytes.NewReader(body))
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		if h == "host" {
			continue
		}
		re.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
	}
	re.Host = r.Host
	if err := v4.NewSigner().SignHTTP(r.Context(), k.creds, re, hex.EncodeToString(sum[:]), "kms", k.region, when); err != nil {
		return &kmsFault{500, "KMSInternalException", err.Error()}
	}
	if got := re.Header.Get("Authorization"); got != auth {
		return &kmsFault{400, "InvalidSignatureException", "The request signature we calculated does not match the signature you provided"}
	}
	return nil
}

type recipientIn struct {
	AttestationDocument    []byte
	KeyEncryptionAlgorithm string
}

// checkRecipient verifies the attestation document and the PCR conditions
// and returns the public key to encrypt to.
func (k *KMS) checkRecipient(r *recipientIn) (*rsa.PublicKey, *kmsFault) {
	if r == nil {
		return nil, &kmsFault{400, "AccessDeniedException", "the key policy requires a Recipient (kms:RecipientAttestation:PCR0)"}
	}
	if r.KeyEncryptionAlgorithm != "RSAES_OAEP_SHA_256" {
		return nil, &kmsFault{400, "ValidationException", "KeyEncryptionAlgorithm " + r.KeyEncryptionAlgorithm}
	}
	k.mu.Lock()
	pcrs := k.pcrs
	k.mu.Unlock()
	doc, err := verify.Verify(r.AttestationDocument, verify.Options{Root: k.root, PCRs: pcrs})
	if errors.Is(err, verify.ErrPCRMismatch) {
		return nil, &kmsFault{400, "AccessDeniedException", "the attestation document does not satisfy the key policy's PCR conditions"}
	}
	if err != nil {
		return nil, &kmsFault{400, "ValidationException", "invalid attestation document: " + err.Error()}
	}
	pub, err := x509.ParsePKIXPublicKey(doc.PublicKey)
	rsaPub, ok := pub.(*rsa.PublicKey)
	if err != nil || !ok || rsaPub.N.BitLen() < 2048 {
		return nil, &kmsFault{400, "ValidationException", "the attestation document's public key is not an RSA key of 2048 bits or more"}
	}
	return rsaPub, nil
}

func (k *KMS) generateDataKey(body []byte) (any, *kmsFault) {
	var in struct {
		KeyId             string
		KeySpec           string
		EncryptionContext map[string]string
		Recipient         *recipientIn
	}
	if err := json.Unmarshal(body, &in); err != nil {
		return nil, &kmsFault{400, "SerializationException", err.Error()}
	}
	if in.KeyId != k.keyARN {
		return nil, &kmsFault{400, "NotFoundException", "Key '" + in.KeyId + "' does not exist"}
	}
	if in.KeySpec != "AES_256" {
		return nil, &kmsFault{400, "ValidationException", "KeySpec " + in.KeySpec}
	}
	pub, e := k.checkRecipient(in.Recipient)
	if e != nil {
		return nil, e
	}
	dk := make([]byte, 32)
	_, _ = rand.Read(dk)
	k.mu.Lock()
	k.issued = append(k.issued, bytes.Clone(dk))
	k.mu.Unlock()
	out := map[string]any{"KeyId": k.keyARN, "CiphertextBlob": k.seal(dk, in.EncryptionContext), "CiphertextForRecipient": k.Envelope(dk, pub)}
	if k.misbehaving() == "plaintext" {
		out["Plaintext"] = dk
	}
	return out, nil
}

func (k *KMS) decrypt(body []byte) (any, *kmsFault) {
	var in struct {
		CiphertextBlob    []byte
		KeyId             string
		EncryptionContext map[string]string
		Recipient         *recipientIn
	}
	if err := json.Unmarshal(body, &in); err != nil {
		return nil, &kmsFault{400, "SerializationException", err.Error()}
	}
	if in.KeyId != "" && in.KeyId != k.keyARN {
		return nil, &kmsFault{400, "IncorrectKeyException", "the ciphertext was not encrypted under " + in.KeyId}
	}
	dk, ok := k.unseal(in.CiphertextBlob, in.EncryptionContext)
	if !ok {
		return nil, &kmsFault{400, "InvalidCiphertextException", ""}
	}
	pub, e := k.checkRecipient(in.Recipient)
	if e != nil {
		return nil, e
	}
	out := map[string]any{"KeyId": k.keyARN, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT", "CiphertextForRecipient": k.Envelope(dk, pub)}
	if k.misbehaving() == "plaintext" {
		out["Plaintext"] = dk
	}
	return out, nil
}

// seal and unseal are the fake's CiphertextBlob: AES-GCM under its master
// key, the key ARN and the encryption context as associated data (KMS
// binds a blob to its encryption context the same way).
func (k *KMS) seal(dk []byte, ec map[string]string) []byte {
	block, _ := aes.NewCipher(k.master)
	gcm, _ := cipher.NewGCM(block)
	nonce := make([]byte, gcm.NonceSize())
	_, _ = rand.Read(nonce)
	return gcm.Seal(nonce, nonce, dk, k.aad(ec))
}

func (k *KMS) unseal(blob []byte, ec map[string]string) ([]byte, bool) {
	block, _ := aes.NewCipher(k.master)
	gcm, _ := cipher.NewGCM(block)
	if len(blob) < gcm.NonceSize() {
		return nil, false
	}
	dk, err := gcm.Open(nil, blob[:gcm.NonceSize()], blob[gcm.NonceSize():], k.aad(ec))
	return dk, err == nil
}

func (k *KMS) aad(ec map[string]string) []byte {
	b, _ := json.Marshal(ec) // sorted keys
	return append([]byte(k.keyARN+"\x00"), b...)
}

// Envelope is CiphertextForRecipient: CMS EnvelopedData, version 2, one
// KeyTransRecipientInfo (subjectKeyIdentifier) with RSAES-OAEP SHA-256,
// AES-256-CBC content.
func (k *KMS) Envelope(dk []byte, pub *rsa.PublicKey) []byte {
	if k.misbehaving() == "other-recipient" {
		other, _ := rsa.GenerateKey(rand.Reader, 2048)
		pub = &other.PublicKey
	}
	cek, iv := make([]byte, 32), make([]byte, 16)
	_, _ = rand.Read(cek)
	_, _ = rand.Read(iv)
	pad := 16 - len(dk)%16
	pt := append(append([]byte(nil), dk...), bytes.Repeat([]byte{byte(pad)}, pad)...)
	block, _ := aes.NewCipher(cek)
	ct := make([]byte, len(pt))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, pt)
	ek, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, cek, nil)
	if err != nil {
		panic(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(pub)
	ski := sha1.Sum(spki)
	type algID struct {
		Algorithm  asn1.ObjectIdentifier
		Parameters asn1.RawValue `asn1:"optional"`
	}
	sha256ID := algID{Algorithm: oidSHA256}
	oaepParams, _ := asn1.Marshal(struct {
		Hash algID `asn1:"explicit,tag:0"`
		MGF  algID `asn1:"explicit,tag:1"`
	}{sha256ID, algID{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 8}, Parameters: mustRaw(sha256ID)}})
	ivRaw, _ := asn1.Marshal(iv)
	ed := struct {
		Version        int
		RecipientInfos []asn1.RawValue `asn1:"set"`
		Content        struct {
			ContentType asn1.ObjectIdentifier
			Alg         algID
			Encrypted   []byte `asn1:"tag:0"`
		}
	}{Version: 2}
	ktri, _ := asn1.Marshal(struct {
		Version int
		RID     []byte `asn1:"tag:0"`
		Alg     algID
		Key     []byte
	}{2, ski[:], algID{asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}, asn1.RawValue{FullBytes: oaepParams}}, ek})
	ed.RecipientInfos = []asn1.RawValue{{FullBytes: ktri}}
	ed.Content.ContentType = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	ed.Content.Alg = algID{asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}, asn1.RawValue{FullBytes: ivRaw}}
	ed.Content.Encrypted = ct
	edDER, err := asn1.Marshal(ed)
	if err != nil {
		panic(err)
	}
	ci, err := asn1.Marshal(struct {
		ContentType asn1.ObjectIdentifier
		Content     asn1.RawValue // [0] EXPLICIT, built by hand: a RawValue ignores tags
	}{asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 3}, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: edDER}})
	if err != nil {
		panic(err)
	}
	return ci
}

var oidSHA256 = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}

func mustRaw(v any) asn1.RawValue {
	b, err := asn1.Marshal(v)
	if err != nil {
		panic(err)
	}
	return asn1.RawValue{FullBytes: b}
}

func (k *KMS) misbehaving() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.misbehave
}

// Calls lists the operations called so far, in order.
func (k *KMS) Calls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.calls...)
}

// DataKeys returns every data key the fake made, in clear: for tests
// that search logs for them.
func (k *KMS) DataKeys() [][]byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([][]byte(nil), k.issued...)
}

// Called is Calls as one string, for messages.
func (k *KMS) Called() string { return fmt.Sprint(k.Calls()) }
