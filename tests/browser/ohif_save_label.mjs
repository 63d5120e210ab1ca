// The OHIF annotator's loop in Debian's Chromium, through MONAI Label mode as served by the app:
// a bad server address first (a message, no crash); connect; click on the spleen, Run medsam_2d and
// medsam_3d (only medsam_2d with "quick"); Save Label; then (with "train") Update Model, wait for
// DONE, and Run medsam_3d again.
// Prints one JSON line per step; keeps each Run's label (raw NRRD) and screenshots in OUT_DIR.
//
//   node ohif_save_label.mjs SERVER_URL STUDY_UID OUT_DIR [train|quick]
import { mkdirSync, writeFileSync } from 'node:fs';
import { launchChromium } from './chromium.mjs';

const [server, study, out, mode] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const report = (step) => console.log(JSON.stringify(step));

const browser = await launchChromium();
try {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  // no cookie set: the app's config points the panel at the server that serves the page
  await page.goto(`${server}/ohif/monai-label?StudyInstanceUIDs=${study}`, { waitUntil: 'domcontentloaded' });
  await page.waitForSelector('#medsam-save-label', { timeout: 120000 });
  await page.waitForSelector('.cornerstone-canvas', { timeout: 120000 });
  await page.waitForTimeout(3000); // let the three MPR viewports render
  await page.click('text=Confirm and Hide', { timeout: 3000 }).catch(() => {});
  const field = page.locator('#monailabelServerURL');
  report({ step: 'default_server', value: await field.inputValue() });

  // a server address that is not a URL: a message, the viewer stays
  await field.fill('not a server');
  await page.locator('.cornerstone-canvas').first().hover();
  await page.click('#medsam-ohif'); // moves the focus out of the field
  await page.click('table.settingsTable button'); // Connect with the bad address
  await page.waitForTimeout(1000);
  report({
    step: 'bad_server',
    panel: await page.locator('table.settingsTable').count(),
    viewports: await page.locator('.cornerstone-canvas').count(),
    message: await page.locator('#medsam-saved').textContent(),
    notifications: await page.locator('text=is not a server address').count(),
    errors: errors.slice(),
  });
  await page.screenshot({ path: `${out}/bad_server.png` });
  await field.fill(`${server}/`);
  await page.click('table.settingsTable button'); // connect
  await page.waitForSelector('text=Point Prompts', { timeout: 60000 });
  await page.click('text=Point Prompts');
  const canvases = page.locator('.cornerstone-canvas');

  async function run(task, name) {
    // choosing a model clears the points, so: model, then anatomy, then the click
    await page.locator('select.selectBox').filter({ has: page.locator(`option[value="${task}"]`) }).selectOption(task);
    await page.click('tr.clickable-row:has-text("spleen")');
    await page.waitForTimeout(500);
    const axial = await canvases.nth(0).boundingBox();
    await page.mouse.click(axial.x + axial.width * 0.5, axial.y + axial.height * 0.55); // inside the spleen
    await page.waitForTimeout(1000);
    const [response] = await Promise.all([
      page.waitForResponse((r) => r.url().includes(`/infer/${task}`), { timeout: 1200000 }),
      page.click('button[title="Run PointPrompts"]'),
    ]);
    const body = await response.body();
    writeFileSync(`${out}/${name}.nrrd`, body);
    await page.waitForTimeout(3000); // the overlay is drawn after the label is copied into the labelmap
    await page.screenshot({ path: `${out}/${name}.png` });
    report({
      step: 'run', task, name, status: response.status(), version: response.headers()['x-model-version'] || null,
      shown: await page.locator('#medsam-model-version').textContent(),
    });
  }

  await run('medsam_2d', 'run_2d');
  if (mode !== 'quick') await run('medsam_3d', 'run_3d');

  // Save Label: the panel's labelmap as label.bin with its names
  const [saved] = await Promise.all([
    page.waitForResponse((r) => r.url().includes('/datastore/label') && r.request().method() === 'PUT', { timeout: 300000 }),
    page.click('#medsam-save-label'),
  ]);
  await page.waitForFunction(() => document.querySelector('#medsam-saved').textContent.startsWith('Saved'), null, { timeout: 60000 }).catch(() => {});
  await page.screenshot({ path: `${out}/saved.png` });
  report({
    step: 'save', status: saved.status(), url: saved.url(), answer: await saved.text(),
    shown: await page.locator('#medsam-saved').textContent(),
  });

  if (mode === 'train') {
    await page.click('text=Active Learning');
    const [train] = await Promise.all([
      page.waitForResponse((r) => /\/train\/?$/.test(new URL(r.url()).pathname) && r.request().method() === 'POST', { timeout: 60000 }),
      page.click('button:has-text("Update Model")'),
    ]);
    const progress = [];
    const deadline = Date.now() + 900000;
    let text = '';
    while (Date.now() < deadline) {
      text = await page.locator('#medsam-training').textContent();
      if (!progress.includes(text)) progress.push(text);
      if (/DONE|ERROR/.test(text)) break;
      await page.waitForTimeout(2000);
    }
    await page.screenshot({ path: `${out}/trained.png` });
    report({ step: 'train', status: train.status(), progress, shown: text });
    await page.click('text=Point Prompts');
    await run('medsam_3d', 'run_after_training');
  }
  report({ step: 'end', errors });
} finally {
  await browser.close();
}
